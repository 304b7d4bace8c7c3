"""EXPERT_SERVE_ON_CHAIN=1: publish on the chain where this service serves (Bittensor's
`serve_axon`), so that routers with ROUTER_DISCOVERY=chain find it without the Redis registry.

On Bittensor only this service's hotkey can change its listing, so no other miner can delete or
redirect it (on the local chain, whoever reaches its Redis can). At start, once the service answers
(after SERVING), the endpoint is published unless the chain already lists it for this hotkey:
Bittensor rate-limits `serve_axon` and charges for it. While the chain is unreachable or the hotkey
is not registered yet (a Kubernetes Job may register it a minute later), the service keeps serving
and tries again every `retry_s`; what can never be published (a hostname on Bittensor, a bind
address) fails the start instead (ExpertServer).

Once published, the listing is checked every `check_s` (EXPERT_LISTING_CHECK_S; 0 = never) and
published again when the chain lists something else for this hotkey or nothing: a listing deleted
or redirected through the local chain's Redis, a hotkey pruned and registered again (its axon is
gone). Endpoints are compared as addresses (`rules.same_endpoint`): Bittensor reads an IPv6
address back in its short form, which must not count as a change (each `serve_axon` is paid for).
Another service publishing under the same hotkey would take the listing back and forth every
`check_s`; the changes are logged with what the chain listed (at most one line per 300 s), so that
the operator sees it.

    listing = ChainListing(chain, identity, "10.0.0.5:50051")
    task = asyncio.create_task(listing.run())
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from subnet.chain.base import Chain, Neuron
from subnet.chain.rules import same_endpoint
from subnet.chain.signing import serve_payload
from subnet.identity import Identity
from subnet.log_throttle import LogThrottle

log = logging.getLogger(__name__)


class ChainListing:
    def __init__(self, chain: Chain, identity: Identity, endpoint: str, retry_s: float = 30.0,
                 check_s: float = 300.0, on_listed: Callable[[bool], None] = lambda listed: None,
                 on_published: Callable[[], None] = lambda: None):
        """`on_listed(listed)` (the service's `expert_chain_listed` gauge): True after a publication or a
        check that finds the listing, False after a failed publication or a check that finds it gone;
        not called when a check cannot read the chain. `on_published()` after every `serve` sent."""
        if retry_s <= 0 or check_s < 0:
            raise ValueError(f"retry_s must be positive and check_s >= 0, got {retry_s} and {check_s}")
        self.chain, self.identity, self.endpoint = chain, identity, endpoint
        self.retry_s, self.check_s = retry_s, check_s
        self.on_listed, self.on_published = on_listed, on_published
        self.published = False   # the chain lists `endpoint` for this hotkey (by us or before us), as last seen
        self._publish_failures = LogThrottle(300.0)
        self._check_failures = LogThrottle(300.0)
        self._changes = LogThrottle(300.0)

    def _listed(self) -> tuple[bool, Neuron | None]:
        """(whether the chain lists this endpoint for this hotkey, the hotkey's neuron)."""
        neuron = self.chain.metagraph().by_hotkey(self.identity.hotkey)
        return neuron is not None and same_endpoint(neuron.endpoint, self.endpoint), neuron

    def publish_once(self) -> None:
        """Publish unless the chain already lists this endpoint; `published` afterwards. Raises what
        the chain raises (ChainError: not registered, refused, unreachable)."""
        hotkey = self.identity.hotkey
        if self._listed()[0]:
            log.info("the chain already lists %s for hotkey %s", self.endpoint, hotkey)
        else:
            self.chain.serve(hotkey, self.endpoint, self.identity.sign(serve_payload(hotkey, self.endpoint)))
            self.on_published()
            log.info("published %s on the chain for hotkey %s", self.endpoint, hotkey)
        self.published = True
        self.on_listed(True)

    def check_once(self) -> bool:
        """Whether the chain still lists this endpoint for this hotkey; when not, logs what it lists
        instead and clears `published`, so that `run` publishes again. Raises what the chain raises."""
        listed, neuron = self._listed()
        if listed:
            self.on_listed(True)
            return True
        # repr: on the local chain the stored endpoint is whatever a writer of its Redis put there.
        found = ("the hotkey is not registered" if neuron is None
                 else f"it lists {neuron.endpoint[:300]!r}" if neuron.endpoint else "it lists no endpoint")
        self._changes.warning(log, "the chain no longer lists %s for hotkey %s (%s); publishing it again. "
                              "Another service under this hotkey, a re-registration or, on the local chain, a "
                              "writer of its Redis changed it", self.endpoint, self.identity.hotkey, found)
        self.published = False
        self.on_listed(False)
        return False

    async def run(self) -> None:
        """Publish until the chain takes it, then check every `check_s` and publish again when the
        listing is gone (the chain's calls run in a thread: they block). Returns only when
        check_s is 0, once published."""
        while True:
            if not self.published:
                try:
                    await asyncio.to_thread(self.publish_once)
                except Exception as e:  # the chain is remote: any failure means "try again later", never a crash
                    self.on_listed(False)
                    self._publish_failures.warning(
                        log, "could not publish %s on the chain (trying again every %.0f s): %s: %s",
                        self.endpoint, self.retry_s, type(e).__name__, str(e)[:300])
                    await asyncio.sleep(self.retry_s)
                    continue
            if not self.check_s:
                return
            await asyncio.sleep(self.check_s)
            try:
                await asyncio.to_thread(self.check_once)
            except Exception as e:  # an unreadable chain says nothing about the listing: keep it, look again later
                self._check_failures.warning(
                    log, "could not read the chain to check the listing of %s (looking again in %.0f s): %s: %s",
                    self.endpoint, self.check_s, type(e).__name__, str(e)[:300])
