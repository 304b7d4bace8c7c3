"""Request-signing settings shared by every service, and the one place that builds them into parts.

    auth = from_env(AuthConfig)                       # or nested in a service's config
    identity = service_identity(auth, wallet_config, what="expert service")   # None when AUTH_MODE=off
    server_auth = build_server_auth(auth, identity, open_methods={...}, validator_permit=True)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from subnet.auth.nonces import MemoryNonceStore, RedisNonceStore
from subnet.auth.policy import AllowList, AnyOf, ChainPolicy, Policy
from subnet.auth.server import ServerAuth
from subnet.auth.verify import Verifier
from subnet.chain.base import Chain
from subnet.config_checks import check_redis_url
from subnet.envconfig import env, from_env
from subnet.identity import Identity, WalletConfig, is_hotkey, load_identity

log = logging.getLogger(__name__)

AUTH_MODES = ("on", "off")


@dataclass(frozen=True)
class AuthConfig:
    """How a service signs its calls and checks the requests it receives."""

    mode: str = env("AUTH_MODE", "on", "`on`: requests must be signed by an allowed hotkey and this service signs "
                                       "its own calls (needs the wallet); `off`: nothing is signed or checked "
                                       "(benchmarks only)")
    window_s: float = env("AUTH_WINDOW_S", 10.0, "a signed request's timestamp may be this far from the receiver's "
                                                 "clock; nonces are remembered twice as long")
    allowlist: tuple[str, ...] = env("AUTH_ALLOWLIST", (), "comma-separated ss58 hotkeys allowed to call")
    chain: bool = env("AUTH_CHAIN", False, "also allow hotkeys registered on the chain (expert: with a validator "
                                           "permit; router: any registered hotkey); the chain is configured by "
                                           "subnet.chain's variables")
    chain_refresh_s: float = env("AUTH_CHAIN_REFRESH_S", 60.0, "how often AUTH_CHAIN re-reads the metagraph")
    chain_retry_s: float = env("AUTH_CHAIN_RETRY_S", 5.0, "re-read the metagraph this soon (never sooner) after a "
                                                          "failed read or a denied hotkey, which may have registered "
                                                          "since; at most AUTH_CHAIN_REFRESH_S")
    redis_url: str = env("AUTH_REDIS_URL", "", "Redis remembering seen nonces, shared by every process with this "
                                               "hotkey; empty = this process's memory")

    def __post_init__(self):
        if self.mode not in AUTH_MODES:
            raise ValueError(f"AUTH_MODE={self.mode!r}: choose one of {', '.join(AUTH_MODES)}")
        if self.window_s <= 0 or self.chain_refresh_s <= 0 or self.chain_retry_s <= 0:
            raise ValueError("AUTH_WINDOW_S, AUTH_CHAIN_REFRESH_S and AUTH_CHAIN_RETRY_S must be positive")
        check_redis_url("AUTH_REDIS_URL", self.redis_url)
        bad = [h for h in self.allowlist if not is_hotkey(h)]
        if bad:
            raise ValueError(f"AUTH_ALLOWLIST has entries that are not ss58 hotkeys: {', '.join(bad[:3])}")

    @property
    def enabled(self) -> bool:
        return self.mode == "on"


def service_identity(config: AuthConfig, wallet: WalletConfig, given: Identity | None = None, *,
                     what: str = "service") -> Identity | None:
    """The identity a service signs and verifies with: `given` or the wallet's hotkey (IdentityError
    when it cannot be loaded). With AUTH_MODE=off: `given` (usually None), and a WARNING."""
    if not config.enabled:
        log.warning("AUTH_MODE=off: the %s does not authenticate requests and does not sign its calls; "
                    "anyone who reaches its port can use it (for benchmarks only)", what)
        return given
    return given if given is not None else load_identity(wallet)


def open_auth_chain() -> Chain:
    """The chain AUTH_CHAIN checks against, configured by subnet.chain's own variables (CHAIN, ...).
    Read-only: no wallet is given, the policy only reads the metagraph."""
    from subnet.chain.config import ChainConfig, open_chain
    from subnet.rounds import RoundConfig

    return open_chain(from_env(ChainConfig), from_env(RoundConfig).schedule())


def build_server_auth(config: AuthConfig, identity: Identity, *, open_methods: Collection[str],
                      validator_permit: bool, on_reject: Callable[[str], None] | None = None,
                      chain: Chain | None = None) -> ServerAuth:
    """A ServerAuth for a receiver with `identity`: AUTH_ALLOWLIST, and with
    AUTH_CHAIN the chain's hotkeys (`validator_permit`: only those with a permit); nonces in
    AUTH_REDIS_URL or in memory. `chain` defaults to `open_auth_chain()` when AUTH_CHAIN is set."""
    parts: list[Policy] = []
    allowed = set(config.allowlist)
    if allowed or not config.chain:
        parts.append(AllowList(allowed))
    chain_policy = None
    if config.chain:
        chain_policy = ChainPolicy(chain or open_auth_chain(), validator_permit, config.chain_refresh_s,
                                   retry_s=config.chain_retry_s).start()
        parts.append(chain_policy)
    if not allowed and not config.chain:
        log.warning("AUTH_ALLOWLIST is empty and AUTH_CHAIN is off: every signed request will be refused")
    ttl_s = 2 * config.window_s
    nonces = RedisNonceStore(config.redis_url, ttl_s) if config.redis_url else MemoryNonceStore(ttl_s)
    verifier = Verifier(identity.hotkey, parts[0] if len(parts) == 1 else AnyOf(*parts), nonces, config.window_s)
    return ServerAuth(verifier, open_methods, on_reject=on_reject,
                      close=chain_policy.stop if chain_policy is not None else None, identity=identity)
