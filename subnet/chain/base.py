"""The chain as the subnet sees it: one interface, a local implementation (Redis) for the
stack and the tests, and a Bittensor one over the SDK. Callers depend on `Chain` only.

Vocabulary shared by every implementation:
- a *neuron* is a registered hotkey with a uid on the subnet;
- a *validator permit* lets a hotkey set weights (and, here, call expert services);
- a *commitment* is a hash a hotkey publishes first (commit) and opens later (reveal), so
  nobody can copy a checkpoint after seeing it and claim it as their own;
- an *endpoint* is the `host:port` a hotkey serves at, published by the hotkey (`serve`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


class ChainError(RuntimeError):
    """The chain refused an operation or could not be reached; the message says which and why."""


@dataclass(frozen=True)
class Neuron:
    uid: int
    hotkey: str
    coldkey: str = ""
    stake: float = 0.0
    validator_permit: bool = False
    incentive: float = 0.0
    last_weights_block: int | None = None   # block of this hotkey's last set_weights, if it set any
    # Where this hotkey serves (`host:port`, its axon on Bittensor), so callers find its services on
    # the chain; "" = it serves nothing. Last, with a default: callers build Neurons positionally.
    endpoint: str = ""


@dataclass(frozen=True)
class Metagraph:
    block: int
    neurons: tuple[Neuron, ...] = ()

    def by_hotkey(self, hotkey: str) -> Neuron | None:
        return next((n for n in self.neurons if n.hotkey == hotkey), None)

    def by_uid(self, uid: int) -> Neuron | None:
        return next((n for n in self.neurons if n.uid == uid), None)

    @property
    def hotkeys(self) -> frozenset[str]:
        return frozenset(n.hotkey for n in self.neurons)

    @property
    def validator_hotkeys(self) -> frozenset[str]:
        return frozenset(n.hotkey for n in self.neurons if n.validator_permit)


@dataclass(frozen=True)
class Hyperparameters:
    tempo: int = 60                 # blocks per round (one train -> ... -> merge cycle)
    # The chain's own commit-reveal of *weights* (Bittensor's CommitRevealWeightsEnabled and
    # reveal_period, in tempos): set_weights is sealed that long before it counts. LocalChain
    # has none (weights count at once). Not to be confused with the subnet's checkpoint
    # commitments, whose reveal window is the round schedule's reveal phase.
    commit_reveal_period: int = 1
    commit_reveal_enabled: bool = False
    block_s: float = 12.0           # seconds per block (Bittensor 12 s; LocalChain as configured)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Commitment:
    hotkey: str
    round: int
    digest: str                     # hex sha256 committed
    commit_block: int
    revealed: str | None = None     # the revealed data (e.g. the manifest's S3 key), once revealed
    reveal_block: int | None = None
    # Order among the commitments of one block, as the chain applied them (LocalChain: its own
    # sequence). 0 where the chain does not say (BittensorChain): ties then go by hotkey. A copy's
    # commitment always comes after its original's (the copier must see the publication first),
    # so the order decides who copied whom, even within a block.
    commit_index: int = 0


class Chain(abc.ABC):
    """What the subnet needs from a chain. Implementations raise ChainError with a clear message."""

    @abc.abstractmethod
    def block(self) -> int: ...

    @abc.abstractmethod
    def register(self, hotkey: str, coldkey: str = "", stake: float = 0.0) -> int:
        """Register `hotkey` (idempotent) and return its uid. On Bittensor, where registering
        costs TAO, only checks that the hotkey is registered."""

    @abc.abstractmethod
    def metagraph(self) -> Metagraph: ...

    @abc.abstractmethod
    def hyperparameters(self) -> Hyperparameters: ...

    @abc.abstractmethod
    def commit(self, hotkey: str, round: int, digest: str, signature: bytes) -> None:
        """Publish `digest` (hex sha256 of the data to reveal later) for `round` under `hotkey`.

        `signature` is the hotkey's sr25519 signature of `commit_payload(hotkey, round, digest)`.
        One commitment per hotkey per round, made in the round's commit window (its train and
        commit phases, `RoundSchedule.commit_window`)."""

    @abc.abstractmethod
    def reveal(self, hotkey: str, round: int, data: str, signature: bytes) -> None:
        """Open the commitment of `round`: `sha256(data.encode()).hexdigest()` must equal the
        committed digest, and the reveal must fall in the round's reveal phase
        (`RoundSchedule.reveal_window`). `signature` signs `reveal_payload(hotkey, round, data)`."""

    @abc.abstractmethod
    def commitments(self, round: int) -> list[Commitment]:
        """The commitments made for `round`, with their reveals where valid, by commit block."""

    @abc.abstractmethod
    def set_weights(self, hotkey: str, uids: list[int], weights: list[float], signature: bytes) -> None:
        """Set `hotkey`'s weights (validator permit required); normalized to sum 1 by the chain.
        `signature` signs `weights_payload(hotkey, uids, weights)`."""

    @abc.abstractmethod
    def serve(self, hotkey: str, endpoint: str, signature: bytes) -> None:
        """Publish `endpoint` ("host:port", see `rules.check_endpoint`) as where `hotkey` (registered)
        serves; replaces its earlier endpoint. `signature` is the hotkey's sr25519 signature of
        `serve_payload(hotkey, endpoint)`."""

    @abc.abstractmethod
    def weights(self) -> dict[int, dict[int, float]]:
        """{validator uid: {uid: normalized weight}} as last set."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
