"""The scorer's view of the miners, as the router reads it from Redis (written by services/scorer):

    moe:scores:ema       hash hotkey -> EMA of the composite score
    moe:scores:banned    set of hotkeys that failed verification in the last round or whose EMA
                         is near zero

Read together with the registry (services/router/replicas.py), never per call.
"""

from __future__ import annotations

import redis

EMA_KEY = "moe:scores:ema"
BANNED_KEY = "moe:scores:banned"


class RedisScores:
    def __init__(self, client: redis.Redis, ema_key: str = EMA_KEY, banned_key: str = BANNED_KEY):
        self.client, self.ema_key, self.banned_key = client, ema_key, banned_key

    def scores(self) -> tuple[dict[str, float], set[str]]:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.ema_key)
        pipe.smembers(self.banned_key)
        ema, banned = pipe.execute()
        return ({_text(k): float(v) for k, v in ema.items()}, {_text(h) for h in banned})


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
