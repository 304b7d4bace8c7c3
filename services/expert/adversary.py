"""Adversarial miners, for the tests and the demo only: they show that cheaters lose.

`EXPERT_ADVERSARY` picks one; the service refuses to start with it unless
`EXPERT_ALLOW_ADVERSARY=1` (a test flag no honest deployment sets):

- `lazy`: acknowledges every ApplyStep without stepping, so it publishes unchanged weights;
- `noisy`: publishes its weights plus large random noise (std = EXPERT_ADVERSARY_NOISE x each
  tensor's own std);
- `copycat`: publishes another miner's checkpoint of the same round (waiting for one to
  appear) as its own, signed with its own hotkey;
- `liar`: publishes its honest weights but answers every Forward with random outputs.

(A `replayer`, re-sending a captured signed request to another service, is a client, not a
service mode: the end-to-end test plays it.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch

from subnet.checkpoint_loading import load_verified_experts
from subnet.checkpoints import checkpoint_prefix, read_verified
from subnet.manifest import MANIFEST_NAME
from subnet.object_store import ObjectStore

log = logging.getLogger(__name__)
MODES = ("lazy", "noisy", "copycat", "liar")
States = dict[str, dict[str, torch.Tensor]]


def liar_answer(y: torch.Tensor) -> torch.Tensor:
    """Outputs of the right shape and scale that have nothing to do with the weights."""
    return torch.randn_like(y) * (y.std() if y.numel() > 1 else 1.0)


def noisy(snapshot: Callable[[], States], scale: float) -> Callable[[], States]:
    def take() -> States:
        return {uid: {name: t + torch.randn_like(t) * t.std() * scale for name, t in state.items()}
                for uid, state in snapshot().items()}
    return take


def copycat(store: ObjectStore, own_hotkey: str, uids: Iterable[str], dim: int, inter_dim: int,
            schedule, chain, wait_s: float = 20.0) -> Callable[[], States]:
    """A snapshot function that returns another hotkey's published experts of the current round."""
    uids = list(uids)

    def take() -> States:
        round = schedule.at(chain.block()).round
        deadline = time.monotonic() + wait_s
        while True:
            victim = _other_publisher(store, own_hotkey, uids, round)
            if victim is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"copycat: nobody else published {uids} in round {round}")
            time.sleep(0.5)
        states: States = {}
        for uid in uids:
            key = f"{checkpoint_prefix('expert', uid=uid, hotkey=victim, round=round)}/{MANIFEST_NAME}"
            states.update(load_verified_experts(read_verified(store, key, expected_hotkey=victim), [uid], dim,
                                                inter_dim))
        log.warning("copycat: publishing %s's round %d experts as ours", victim[:10], round)
        return states

    return take


def _other_publisher(store: ObjectStore, own_hotkey: str, uids: list[str], round: int) -> str | None:
    """A hotkey other than ours that published every uid in `uids` for `round`."""
    candidates: set[str] | None = None
    for uid in uids:
        prefix = f"checkpoints/experts/{uid}/"
        found = {key[len(prefix):].split("/")[0] for key in store.list(prefix)
                 if key.endswith(f"/{round}/{MANIFEST_NAME}")}
        found.discard(own_hotkey)
        candidates = found if candidates is None else candidates & found
    return min(candidates) if candidates else None
