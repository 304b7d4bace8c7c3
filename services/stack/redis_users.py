"""The local stack's Redis users: `default` for the router, validator, scorer and the stack
itself, `miner` (subnet.redis_acl) for the expert services. Fresh random passwords each run:
the stack's Redis lives as long as the stack."""

from __future__ import annotations

import secrets

from subnet.redis_acl import MINER_USER, miner_rules

ADMIN_RULES = ["~*", "&*", "+@all"]


def stack_redis_users() -> dict[str, tuple[str, list[str]]]:
    return {"default": (secrets.token_urlsafe(24), ADMIN_RULES),
            MINER_USER: (secrets.token_urlsafe(24), miner_rules(local_chain=True))}
