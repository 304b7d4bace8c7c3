"""What a validator says about one miner in one round, and where it goes in Redis. Shared by the
validator (writes) and the scorer (reads); neither imports the other.

Redis layout (ARCHITECTURE section 6), under a prefix (default `moe:validation:`):

    <prefix>tasks                  stream: one entry per (round, miner) to validate; consumer group
                                   `validators` (VALIDATOR_WORKERS workers)
    <prefix>task:<round>:<hotkey>  string, SET NX: the task was enqueued (so it is enqueued once)
    <prefix>result:<round>         hash hotkey -> ValidationResult JSON, written with HSETNX: a task
                                   done twice is stored once
    <prefix>results                stream: one entry per stored result (fields round, hotkey); the
                                   scorer reads it with its own consumer group `scorers`

A worker acknowledges a task (XACK) only after its result is stored; a task whose worker died
is reclaimed (XAUTOCLAIM) by another after an idle time.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

DEFAULT_PREFIX = "moe:validation:"
TASK_GROUP = "validators"
RESULT_GROUP = "scorers"


@dataclass(frozen=True)
class ValidationResult:
    """One miner, one round. `verified` False or `reason` set means the round scores 0.

    loss_delta: global model's validation loss minus the loss with the miner's experts in
        place (nats/token; > 0 = the miner's experts are better).
    diversity: in [0, 1], how different the miner's experts are from the other experts of
        their layers (1 - mean output cosine similarity on probe activations, clipped).
    active_ratio: in [0, 1], share of the miner's experts the gate sends at least the
        threshold share of tokens to, with the miner's experts in place.
    """

    round: int
    hotkey: str
    uid: int = -1                       # the miner's uid on the chain (-1 = not registered)
    experts: tuple[str, ...] = ()       # expert uids the miner published
    verified: bool = False              # checkpoint verified and live service matches it
    loss: float = math.nan              # validation loss with the miner's experts
    global_loss: float = math.nan       # the global model's loss on the same batches
    loss_delta: float = math.nan
    diversity: float = math.nan
    active_ratio: float = math.nan
    copy_of: str = ""                   # hotkey whose earlier commitment this one copies
    reason: str = ""                    # why the round scores 0 ("" = it does not)
    details: dict = field(default_factory=dict)

    @property
    def zero(self) -> bool:
        return bool(self.reason) or not self.verified

    def to_json(self) -> str:
        data = asdict(self)
        data["experts"] = list(self.experts)
        return json.dumps(data, sort_keys=True, allow_nan=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ValidationResult:
        data = json.loads(text)
        data["experts"] = tuple(data.get("experts", ()))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
