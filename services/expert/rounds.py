"""The expert service's part in the rounds: weights in from S3 at start-up, signed checkpoints
out every round (commit phase, then reveal) and on a timer. Active when S3_ENDPOINT is set.

Start-up weights, first that applies:
1. this hotkey's newest complete checkpoint in S3 (EXPERT_RESUME=1): a restarted miner
   continues its own training;
2. EXPERT_CHECKPOINT as `s3://...`: verified, signed by CHECKPOINT_SIGNERS (default: the
   chain's validators and this hotkey);
3. the server's other sources (a local file, the seed).

This module owns the object store, the publisher and the round participant; the server
only calls `initial_weights`, `start` and `stop`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from moe.experts import SwiGLU
from services.expert import adversary
from services.expert.config import ExpertConfig
from services.expert.metrics import ExpertMetrics
from services.expert.publisher import ExpertPublisher, load_own_checkpoint, open_round
from services.expert.recovery_files import recovery_key
from subnet.chain.base import Chain
from subnet.checkpoint_loading import load_experts_and_manifest, load_verified_experts
from subnet.checkpoints import GLOBAL_EXPERTS_FILE, latest_global_version, read_latest_global
from subnet.object_store import ObjectNotFoundError, ObjectStore, StoreError
from subnet.round_participant import RoundParticipant

log = logging.getLogger(__name__)
SNAPSHOT_TIMEOUT_S = 120.0


class ExpertRounds:
    def __init__(self, config: ExpertConfig, identity, chain: Chain | None, metrics: ExpertMetrics):
        if identity is None:
            raise ValueError("publishing checkpoints needs a hotkey to sign them: set AUTH_MODE=on and WALLET_*")
        if chain is None:
            raise ValueError("publishing checkpoints needs a chain to commit them to (CHAIN_*)")
        self.config, self.identity, self.chain, self.metrics = config, identity, chain, metrics
        self.store = ObjectStore(config.s3)
        self.schedule = config.rounds.schedule()
        self.start_source = ""
        self.publisher: ExpertPublisher | None = None
        self.global_version: int | None = None   # the merged version the hosted weights descend from
        self.initial_moments: dict = {}           # {uid: AdamW moments} saved with the weights resumed from
        self._apply = None
        self.participant: RoundParticipant | None = None
        self._timer: asyncio.Task | None = None

    # -- start-up -------------------------------------------------------------------------

    def initial_weights(self) -> Mapping[str, SwiGLU] | None:
        """The S3 weights this service starts from, or None (blocking: run it off the event loop)."""
        c = self.config
        try:
            self.store.ensure_bucket()
        except StoreError as e:  # a bucket the operator made without create rights is fine
            log.warning("could not ensure bucket %s (%s); going on", self.store.bucket, e)
        if c.resume:
            found = load_own_checkpoint(self.store, c.uids, self.identity.hotkey, c.dim, c.inter_dim,
                                        recovery_key=recovery_key(self.identity))
            if found is not None:
                round, experts, self.global_version, self.initial_moments = found
                self.start_source = f"own checkpoint of round {round}"
                log.info("resumed %d experts from this hotkey's checkpoint of round %d", len(experts), round)
                return experts
        if c.checkpoint.startswith("s3://"):
            try:
                experts, verified = load_experts_and_manifest(c.checkpoint, self.store, c.uids, c.dim, c.inter_dim,
                                                              trusted_hotkeys=self.trusted_signers())
            except ObjectNotFoundError as e:
                if not c.checkpoint.endswith("/global/latest"):
                    raise
                raise ObjectNotFoundError(f"{e}: no global version has been published yet (a validator "
                                          f"publishes version 0 when it starts, from VALIDATOR_INIT_CHECKPOINT); "
                                          f"start this service after it, or let it be restarted") from None
            self.start_source = c.checkpoint
            manifest = verified.manifest
            if manifest.kind == "global":   # the version `latest` named when read, not a second read of it
                self.global_version = manifest.version
            log.info("loaded %d experts from %s: %s (manifest sha256 %s, signed by %s)", len(experts),
                     c.checkpoint, verified.manifest_key, verified.manifest_sha256, manifest.hotkey)
            return experts
        return None

    def trusted_signers(self) -> set[str]:
        if self.config.s3.signers:
            return set(self.config.s3.signers)
        return set(self.chain.metagraph().validator_hotkeys) | {self.identity.hotkey}

    # -- running ----------------------------------------------------------------------------

    def start(self, snapshot, apply, endpoint: str, keep_committed=None, recovery_snapshot=None) -> None:
        """`snapshot()` -> {uid: state dict} and `apply(states)` (load weights), callable from any
        thread (the server runs both on the compute worker); `endpoint`: the service's advertised
        host:port, which its round manifests name for the validators' live check; `keep_committed(round, states)`: given
        each round's published snapshot (ExpertBackend.keep_committed), unless EXPERT_KEEP_COMMITTED=0.
        The adversarial test miners never get it: they keep serving their live weights, as before.
        `recovery_snapshot()` -> (states, {uid: AdamW moments}) for the recovery checkpoints; not
        used by the adversaries, whose published weights are not the ones their moments belong to."""
        c, m = self.config, self.metrics.rounds
        self._apply = apply
        keep = keep_committed if c.keep_committed and not c.adversary else None
        recovery = recovery_snapshot if not c.adversary else None
        if c.adversary == "noisy":
            snapshot = adversary.noisy(snapshot, c.adversary_noise)
        elif c.adversary == "copycat":
            snapshot = adversary.copycat(self.store, self.identity.hotkey, c.uids, c.dim, c.inter_dim,
                                         self.schedule, self.chain)
        self.publisher = ExpertPublisher(self.store, self.identity, snapshot, c.dim, c.inter_dim, endpoint,
                                         parent_version=lambda: self.global_version,
                                         on_published=lambda round, published: m.checkpoints.inc(len(published)),
                                        on_round_published=keep, recovery_snapshot=recovery)
        self.participant = RoundParticipant(self.chain, self.schedule, self.identity, self.publisher.publish,
                                            name=f"expert {self.identity.hotkey[:8]}", on_phase=self._on_phase,
                                            on_record=m.on_record).start()
        if self.config.checkpoint_every_s > 0:
            self._timer = asyncio.create_task(self._publish_every(self.config.checkpoint_every_s),
                                              name="checkpoint-timer")

    def _on_phase(self, now) -> None:
        self.metrics.rounds.on_phase(now)
        if now.phase == "train" and self.config.follow_global:
            self.follow_global()

    def follow_global(self) -> bool:
        """Load the hosted experts from the newest merged global version if it is newer than what
        this service has; True when it did. Optimizer state starts over with the new weights."""
        try:
            version = latest_global_version(self.store)
            if version is None or (self.global_version is not None and version <= self.global_version):
                return False
            verified = read_latest_global(self.store, expected_hotkey=self.trusted_signers())
            states = load_verified_experts(verified, list(self.config.uids), self.config.dim, self.config.inter_dim,
                                           file_name=GLOBAL_EXPERTS_FILE)
            self._apply(states)
            self.global_version = verified.manifest.version
            log.info("loaded the hosted experts from global version %d", self.global_version)
            return True
        except Exception as e:  # a bad or missing global version: keep training what we have
            log.warning("could not follow the global version: %s: %s", type(e).__name__, e)
            return False

    async def _publish_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.publish_recovery()

    async def publish_recovery(self) -> None:
        """Publish this hotkey's recovery checkpoint, stamped with the round still open for commitment
        (outside the rounds' layout: uncommitted work is nobody's to copy from there)."""
        try:
            round = open_round(self.schedule, await asyncio.to_thread(self.chain.block))
            if await asyncio.to_thread(self.publisher.publish_recovery, round):
                log.info("published a recovery checkpoint (round %d open)", round)
        except Exception as e:  # S3 or the chain away: try again at the next tick
            log.warning("recovery checkpoint failed: %s: %s", type(e).__name__, e)

    async def stop(self) -> None:
        """Stop the timer and the participant, then publish once more (a clean stop loses nothing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.participant is not None:
            await asyncio.to_thread(self.participant.stop)
        if self.publisher is not None:
            await self.publish_recovery()

    def history(self):
        return self.participant.history() if self.participant is not None else []
