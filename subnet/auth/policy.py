"""Which authenticated hotkeys a receiver serves.

    policy = AnyOf(AllowList(["5F..."]), ChainPolicy(chain, require_validator_permit=True))
    policy.denial("5G...")   # None = allowed, else why not: "is not in AUTH_ALLOWLIST and ..."

A policy is asked once per request, after the signature is checked, so it must answer
from memory: `ChainPolicy` reads the metagraph in a background thread every `refresh_s`
and never calls the chain on a request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from subnet.chain.base import Chain, Metagraph
from subnet.log_throttle import LogThrottle

log = logging.getLogger(__name__)

MAX_TRACKED_HOTKEYS = 4096   # denied hotkeys remembered per read (a flood of fresh ones must not grow memory)


class Policy(Protocol):
    def denial(self, hotkey: str) -> str | None:
        """None when `hotkey` may call; else the reason, phrased to follow "hotkey <ss58> "."""


class Anyone:
    """Every hotkey with a valid signature (the request is still authenticated)."""

    def denial(self, hotkey: str) -> str | None:
        return None

    def __repr__(self) -> str:
        return "Anyone()"


class AllowList:
    """A fixed set of hotkeys (AUTH_ALLOWLIST)."""

    def __init__(self, hotkeys: Iterable[str], name: str = "AUTH_ALLOWLIST"):
        self.hotkeys = frozenset(hotkeys)
        self.name = name

    def denial(self, hotkey: str) -> str | None:
        return None if hotkey in self.hotkeys else f"is not in {self.name}"

    def __repr__(self) -> str:
        return f"AllowList({len(self.hotkeys)} hotkeys)"


class AnyOf:
    """Allowed when any of the policies allows; else every reason, joined."""

    def __init__(self, *policies: Policy):
        if not policies:
            raise ValueError("AnyOf needs at least one policy")
        self.policies = policies

    def denial(self, hotkey: str) -> str | None:
        reasons = []
        for policy in self.policies:
            reason = policy.denial(hotkey)
            if reason is None:
                return None
            reasons.append(reason)
        return " and ".join(reasons)

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(repr, self.policies))})"


class ChainPolicy:
    """Hotkeys registered on the subnet (optionally: with a validator permit), from a cached metagraph.

    `start()` reads the metagraph once (a failure is logged: until a read succeeds every
    hotkey is denied) and refreshes it every `refresh_s` in a daemon thread; a failed
    refresh keeps the last sets. `stop()` ends the thread.

    Sooner, but never within `retry_s` of the last read: after a failed read, and after a hotkey
    was denied (it may have registered since the last read). Otherwise a miner registered a
    moment after the router's read would get no traffic, and a validator registered after the
    expert's read would be refused, for up to `refresh_s`. A flood of unknown hotkeys costs at
    most one metagraph read per `retry_s`; `denial()` itself still never waits on the chain. A
    hotkey that such an early read denied again (a pruned miner still heartbeating, a caller that
    never registers) asks for no more early reads until the next scheduled one.
    """

    def __init__(self, chain: Chain, require_validator_permit: bool, refresh_s: float = 60.0,
                 retry_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if refresh_s <= 0 or retry_s <= 0:
            raise ValueError(f"refresh_s and retry_s must be positive, got {refresh_s} and {retry_s}")
        self.chain = chain
        self.require_validator_permit = require_validator_permit
        self.refresh_s = refresh_s
        self.retry_s = min(retry_s, refresh_s)
        self.reads = 0                         # metagraph reads tried so far
        self._clock = clock
        self._registered: frozenset[str] | None = None
        self._validators: frozenset[str] = frozenset()
        self.metagraph: Metagraph | None = None   # the last one read (services/router/chain_directory.py)
        self._last_read = float("-inf")
        self._failed = False
        self._wanted = False                   # a hotkey was denied since the last read
        self._hotkeys_lock = threading.Lock()
        self._asking: set[str] = set()         # hotkeys denied since the last read, which asked for it
        self._asked: set[str] = set()          # denied again by an early read: no more asking until a scheduled one
        self._wake = threading.Event()         # set by stop() and by the first denial after a read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure_log = LogThrottle(refresh_s, clock=clock)

    def refresh(self) -> bool:
        """Read the metagraph now; False (and the last sets kept) when the chain fails."""
        self.reads += 1
        early = self._wanted
        self._last_read, self._wanted = self._clock(), False
        with self._hotkeys_lock:
            asking, self._asking = self._asking, set()
        try:
            metagraph = self.chain.metagraph()
        except Exception as e:  # the chain is remote and may fail in any way; requests must not
            with self._hotkeys_lock:
                self._asking |= asking   # still unanswered: they ask again after the retry
            self._failed = True
            self._failure_log.warning(log, "metagraph read failed (keeping the last one, retrying every %.0f s): %s",
                                      self.retry_s, e)
            return False
        self._failed = False
        # Two attribute writes, each atomic; a reader between them sees a consistent-enough pair.
        self._validators = metagraph.validator_hotkeys
        self._registered = metagraph.hotkeys
        self.metagraph = metagraph
        with self._hotkeys_lock:
            if early and len(self._asked) < MAX_TRACKED_HOTKEYS:
                self._asked |= asking
            else:   # a scheduled read: every hotkey may ask once more
                self._asked.clear()
        return True

    def start(self) -> ChainPolicy:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="auth-metagraph", daemon=True)
        self._thread.start()
        return self

    def next_read_in(self) -> float:
        """Seconds until the background thread reads the metagraph again (0: now)."""
        wait = self.retry_s if (self._failed or self._wanted) else self.refresh_s
        return max(0.0, self._last_read + wait - self._clock())

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.next_read_in()
            if delay > 0:
                self._wake.wait(delay)
                self._wake.clear()
                continue   # woken early (a denial, or stop): work the delay out again
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def want_read(self) -> None:
        """Ask for a read `retry_s` after the last one (sooner than `refresh_s`): something was
        seen that the last metagraph may not know yet. One wake-up per read, however often asked."""
        if not self._wanted:
            self._wanted = True
            self._wake.set()

    def denial(self, hotkey: str) -> str | None:
        registered = self._registered
        if registered is None:
            self.want_read()
            return "cannot be checked: the metagraph has not been read yet"
        if hotkey not in registered:
            self._ask_for(hotkey)
            return "is not registered on the subnet"
        if self.require_validator_permit and hotkey not in self._validators:
            self._ask_for(hotkey)
            return "has no validator permit"
        return None

    def _ask_for(self, hotkey: str) -> None:
        """An early read for a denied hotkey, unless an early read already denied it again."""
        with self._hotkeys_lock:
            if hotkey in self._asked:
                return
            if len(self._asking) < MAX_TRACKED_HOTKEYS:
                self._asking.add(hotkey)
        self.want_read()

    def __repr__(self) -> str:
        return f"ChainPolicy(validator_permit={self.require_validator_permit})"
