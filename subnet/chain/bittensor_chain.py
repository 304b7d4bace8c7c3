"""The `Chain` interface over the Bittensor SDK (bittensor 11: `bittensor.Subtensor`).

    chain = BittensorChain("test", netuid=42, wallet=bittensor.Wallet("cold", "hot"), schedule=schedule)

What maps to what:
- block, metagraph, weights, hyperparameters: SDK reads (`subtensor.block`,
  `subnets.metagraph`, `weights.weights`, `subnets.info` + `commit_reveal_enabled` +
  `hyperparameters.reveal_period` + `block_time`).
- register: only checks the hotkey is registered (`neurons.uid`); registering costs TAO from a
  coldkey, which an operator does with `btcli subnets register`.
- set_weights: the SDK's `SetWeights` intent, which clips, u16-quantizes and picks plain or
  timelocked commit-reveal weights by itself, as the subnet is configured.
- serve / Neuron.endpoint: the SDK's `ServeAxon` intent (`serve_axon`, which stores an IP
  address and a port, so a hostname is refused) / the metagraph neuron's `axon`
  ("ip:port" or "[v6]:port"; "" when it serves nothing or reads as no valid endpoint).
- commit / reveal: a plaintext `Commitments.set_commitment` (signed by the hotkey) holding
  `moe1:c:<round>:<digest>`, later replaced by `moe1:r:<round>:<data>`. The pallet keeps only
  a hotkey's latest commitment, so `commitments(round)` reads the commits as of the last
  block of the round's commit window and the reveals as of the last block of its reveal
  phase (older blocks come from the SDK's archive endpoints). The chain enforces no window:
  a record outside its window, or a reveal that does not hash to its commit, is ignored on
  reading; `commit` and `reveal` also refuse to send one, to save the fee.

The commitments pallet rate-limits `set_commitment`, so the commit and the reveal of one
round must be far enough apart for the subnet's limit. The `signature` arguments are checked
like on LocalChain (same contract everywhere); the extrinsics themselves are signed by the
wallet's hotkey, which must be the hotkey named in the call.

The CommitmentInfo shape sent (`{"fields": [{"Raw<n>": bytes}, ...]}`) mirrors how this SDK
decodes commitments; it has not been submitted to a live chain from this repository's tests.
The SDK is imported on first use only: importing it takes most of a second.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from subnet.chain.base import Chain, ChainError, Commitment, Hyperparameters, Metagraph, Neuron
from subnet.chain.rules import (
    axon_address,
    check_commit_block,
    check_digest,
    check_reveal_block,
    check_reveal_matches,
    is_endpoint,
)
from subnet.chain.signing import (
    commit_payload,
    digest_of,
    reveal_payload,
    serve_payload,
    verify_signature,
    weights_payload,
)
from subnet.chain.weights import normalize_weights
from subnet.rounds import RoundSchedule

TAG = "moe1"        # first field of every commitment this subnet writes
RAW_MAX_BYTES = 128  # the largest Raw<N> variant of the Commitments pallet's Data


def encode_commitment(kind: str, round: int, value: str) -> str:
    return f"{TAG}:{kind}:{int(round)}:{value}"


def decode_commitment(text: str | None) -> tuple[str, int, str] | None:
    """(kind, round, value) of a commitment written by `encode_commitment`, else None."""
    parts = (text or "").split(":", 3)
    if len(parts) != 4 or parts[0] != TAG or parts[1] not in ("c", "r") \
            or not (parts[2].isascii() and parts[2].isdigit()):
        return None
    return parts[1], int(parts[2]), parts[3]


def commitment_info(text: str) -> dict:
    """The pallet's CommitmentInfo for `text`: Raw fields of at most 128 bytes each."""
    data = text.encode()
    chunks = [data[i:i + RAW_MAX_BYTES] for i in range(0, len(data), RAW_MAX_BYTES)] or [b""]
    return {"fields": [{f"Raw{len(chunk)}": chunk} for chunk in chunks]}


def _served(axon: Any) -> str:
    """Neuron.endpoint of an SDK neuron's `axon`: "" unless it is a valid endpoint (an axon
    published by other software may hold anything, port 0 included)."""
    return axon if is_endpoint(axon) else ""


def _amount(balance: Any) -> float:
    """A float from an SDK Balance (its `.amount`) or a plain number."""
    return float(getattr(balance, "amount", balance))


class BittensorChain(Chain):
    """A thin adapter: one SDK call (or a few reads) per method, errors turned into ChainError."""

    def __init__(self, network: str, netuid: int, wallet: Any = None, subtensor: Any = None, *,
                 schedule: RoundSchedule):
        if netuid <= 0:
            raise ValueError(f"netuid must be a subnet's uid (> 0), got {netuid}")
        self.network = network
        self.netuid = netuid
        self.wallet = wallet
        self.schedule = schedule
        self._hotkey: str | None = None  # the wallet's hotkey address, read on first use
        self._owns_subtensor = subtensor is None
        if subtensor is None:
            import bittensor  # slow; only the processes that talk to a real chain pay for it

            subtensor = bittensor.Subtensor(network)
        self.subtensor = subtensor

    @contextlib.contextmanager
    def _sdk(self, what: str) -> Iterator[None]:
        # The SDK raises its own errors, websocket and timeout errors; callers handle ChainError only.
        try:
            yield
        except ChainError:
            raise
        except Exception as e:
            raise ChainError(f"bittensor {self.network} netuid {self.netuid}: {what} failed: "
                             f"{type(e).__name__}: {e}") from e

    def block(self) -> int:
        with self._sdk("reading the block"):
            return int(self.subtensor.block)

    def register(self, hotkey: str, coldkey: str = "", stake: float = 0.0) -> int:
        """The hotkey's uid if it is registered; ChainError saying how to register otherwise."""
        with self._sdk("looking up the hotkey's uid"):
            uid = self.subtensor.neurons.uid(hotkey, self.netuid)
        if uid is None:
            raise ChainError(f"hotkey {hotkey} is not registered on netuid {self.netuid} ({self.network}); "
                             f"register it (this costs TAO from its coldkey) with: btcli subnets register "
                             f"--netuid {self.netuid} --hotkey {hotkey} --network {self.network}")
        return int(uid)

    def metagraph(self) -> Metagraph:
        with self._sdk("reading the metagraph"):
            graph = self.subtensor.subnets.metagraph(self.netuid, commitments=False)
        if graph is None:
            raise ChainError(f"netuid {self.netuid} does not exist on {self.network}")
        neurons = tuple(
            Neuron(uid=int(n.uid), hotkey=n.hotkey, coldkey=n.coldkey, stake=_amount(n.total_stake),
                   validator_permit=bool(n.validator_permit), incentive=float(n.incentive),
                   # LastUpdate: bumped by weights (or their commit, under commit-reveal) and by registration.
                   last_weights_block=int(n.last_update) or None,
                   endpoint=_served(getattr(n, "axon", None)))
            for n in graph.neurons)
        return Metagraph(block=int(graph.block), neurons=neurons)

    def hyperparameters(self) -> Hyperparameters:
        with self._sdk("reading hyperparameters"):
            info = self.subtensor.subnets.info(self.netuid)
            enabled = self.subtensor.subnets.commit_reveal_enabled(self.netuid)
            period = self.subtensor.hyperparameters.reveal_period(self.netuid)
            block_s = self.subtensor.block_time()
        return Hyperparameters(tempo=int(info.tempo), commit_reveal_period=int(period),
                               commit_reveal_enabled=bool(enabled), block_s=float(block_s))

    # Commitments ----------------------------------------------------------------------------

    def _own_hotkey(self, hotkey: str, what: str) -> None:
        if self.wallet is None:
            raise ChainError(f"{what}: this BittensorChain has no wallet, so it cannot sign extrinsics")
        if self._hotkey is None:
            from bittensor.signing import public_view  # reads the public key file only, never unlocks

            with self._sdk("reading the wallet's hotkey"):
                self._hotkey = public_view(self.wallet, "hotkey").ss58_address
        own = self._hotkey
        if own != hotkey:
            raise ChainError(f"{what}: this chain signs with hotkey {own}, not {hotkey}")

    def _current_commitment(self, hotkey: str) -> tuple[str, int, str] | None:
        with self._sdk("reading the hotkey's commitment"):
            current = self.subtensor.identity.commitment(self.netuid, hotkey)
        return decode_commitment(current.data) if current is not None else None

    def _publish(self, text: str, what: str) -> None:
        from bittensor import calls

        with self._sdk(what):
            call = calls.Commitments.set_commitment(netuid=self.netuid, info=commitment_info(text))
            self.subtensor.submit_call(call, self.wallet, signer="hotkey").raise_for_failure()

    def commit(self, hotkey: str, round: int, digest: str, signature: bytes) -> None:
        what = f"commit for round {round}"
        self._own_hotkey(hotkey, what)
        verify_signature(hotkey, commit_payload(hotkey, round, digest), signature, what)
        check_digest(digest, what)
        check_commit_block(self.schedule, round, self.block(), what)
        current = self._current_commitment(hotkey)
        if current is not None and current[1] == round:
            raise ChainError(f"{what}: hotkey {hotkey} already committed for round {round}; "
                             f"one commitment per hotkey per round")
        self._publish(encode_commitment("c", round, digest), what)

    def reveal(self, hotkey: str, round: int, data: str, signature: bytes) -> None:
        what = f"reveal for round {round}"
        self._own_hotkey(hotkey, what)
        verify_signature(hotkey, reveal_payload(hotkey, round, data), signature, what)
        check_reveal_block(self.schedule, round, self.block(), what)
        current = self._current_commitment(hotkey)
        if current == ("r", round, data):
            return  # already revealed: a retry after a lost reply
        if current is None or current[:2] != ("c", round):
            raise ChainError(f"{what}: hotkey {hotkey} has no commitment for round {round} on chain")
        check_reveal_matches(data, current[2], what)
        self._publish(encode_commitment("r", round, data), what)

    def commitments(self, round: int) -> list[Commitment]:
        now = self.block()
        commits_window, reveals_window = self.schedule.commit_window(round), self.schedule.reveal_window(round)
        if now < commits_window.start:
            return []
        commits = self._read_commitments(min(now, commits_window.stop - 1))
        reveals = self._read_commitments(min(now, reveals_window.stop - 1)) if now >= reveals_window.start else {}
        out = []
        for hotkey, (kind, rnd, digest, block) in commits.items():
            if (kind, rnd) != ("c", round) or block not in commits_window:
                continue
            opened = reveals.get(hotkey)
            valid = (opened is not None and opened[:2] == ("r", round) and opened[3] in reveals_window
                     and digest_of(opened[2]) == digest)
            out.append(Commitment(hotkey=hotkey, round=round, digest=digest, commit_block=block,
                                  revealed=opened[2] if valid else None, reveal_block=opened[3] if valid else None))
        return sorted(out, key=lambda c: (c.commit_block, c.hotkey))

    def _read_commitments(self, block: int) -> dict[str, tuple[str, int, str, int]]:
        """{hotkey: (kind, round, value, block)} of this subnet's commitments as of `block`."""
        with self._sdk(f"reading commitments at block {block}"):
            rows = self.subtensor.subnets.commitments(self.netuid, block=block)
        out = {}
        for hotkey, row in rows.items():
            decoded = decode_commitment(row.value)
            if decoded is not None:
                out[hotkey] = (*decoded, int(row.block))
        return out

    # Weights --------------------------------------------------------------------------------

    def set_weights(self, hotkey: str, uids: list[int], weights: list[float], signature: bytes) -> None:
        what = "set_weights"
        self._own_hotkey(hotkey, what)
        verify_signature(hotkey, weights_payload(hotkey, uids, weights), signature, what)
        normalized = normalize_weights(uids, weights)
        from bittensor.intents.weights import SetWeights

        with self._sdk(what):
            intent = SetWeights(netuid=self.netuid, uids=list(normalized), weights=list(normalized.values()))
            self.subtensor.execute(intent, self.wallet).raise_for_failure()

    def serve(self, hotkey: str, endpoint: str, signature: bytes) -> None:
        what = "serve"
        self._own_hotkey(hotkey, what)
        ip, port = axon_address(endpoint, what)   # check_endpoint first: the payload needs a str
        verify_signature(hotkey, serve_payload(hotkey, endpoint), signature, what)
        from bittensor.intents.serving import ServeAxon

        with self._sdk(what):
            self.subtensor.execute(ServeAxon(netuid=self.netuid, ip=ip, port=port),
                                   self.wallet).raise_for_failure()

    def weights(self) -> dict[int, dict[int, float]]:
        with self._sdk("reading weights"):
            rows = self.subtensor.weights.weights(self.netuid)
        return {int(v): {int(u): float(w) for u, w in row.items()} for v, row in rows.items()}

    def close(self) -> None:
        if self._owns_subtensor:
            with contextlib.suppress(Exception):  # teardown of a connection that may never have opened
                self.subtensor.close()
