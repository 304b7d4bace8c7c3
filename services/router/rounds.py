"""The router's part in the rounds (S3_ENDPOINT set): it publishes the trunk as a signed
checkpoint in each commit phase, commits it on the chain and reveals it; `serve` can start
from a trunk in S3. Training never waits for S3 or the chain: the snapshot is handed over at
a step boundary and the upload runs on the participant's thread.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from services.router.config import RouterConfig
from services.router.metrics import RouterMetrics
from services.router.trunk_publisher import TrunkSnapshots, fetch_trunk, publish_trunk_round
from subnet.chain.config import open_chain, signing_wallet
from subnet.object_store import ObjectStore
from subnet.round_participant import RoundParticipant

log = logging.getLogger(__name__)


class RouterRounds:
    def __init__(self, config: RouterConfig, identity, metrics: RouterMetrics):
        if identity is None:
            raise ValueError("publishing the trunk needs a hotkey to sign it: set AUTH_MODE=on and WALLET_*")
        self.config, self.identity, self.metrics = config, identity, metrics
        self.store = ObjectStore(config.s3)
        # It commits and reveals: on Bittensor those are extrinsics its hotkey signs.
        self.chain = open_chain(config.chain, config.rounds.schedule(),
                                wallet=signing_wallet(config.chain, config.wallet))
        self.participant: RoundParticipant | None = None

    def start(self, snapshots: TrunkSnapshots, lm_config: dict) -> None:
        self.store.ensure_bucket()
        m = self.metrics.rounds

        def publish(round: int) -> str:
            data = publish_trunk_round(self.store, self.identity, snapshots, lm_config, round)
            m.checkpoints.inc()
            return data

        self.participant = RoundParticipant(self.chain, self.config.rounds.schedule(), self.identity, publish,
                                            name="router", on_phase=m.on_phase, on_record=m.on_record).start()

    def stop(self) -> None:
        if self.participant is not None:
            self.participant.stop()
        self.chain.close()


def fetch_trunk_checkpoint(config: RouterConfig, identity, into: str | Path | None = None) -> Path:
    """Download and verify the s3:// trunk ROUTER_CHECKPOINT names; returns a local checkpoint dir.
    Trusted signers: CHECKPOINT_SIGNERS, else the chain's validators and this router's hotkey."""
    store = ObjectStore(config.s3)
    signers = set(config.s3.signers)
    if not signers:
        chain = open_chain(config.chain, config.rounds.schedule())
        try:
            signers = set(chain.metagraph().validator_hotkeys)
        finally:
            chain.close()
        if identity is not None:
            signers.add(identity.hotkey)
    out = Path(into) if into is not None else Path(tempfile.mkdtemp(prefix="router-trunk-"))
    fetch_trunk(config.checkpoint, store, out, trusted_hotkeys=signers)
    log.info("fetched and verified trunk %s into %s", config.checkpoint, out)
    return out
