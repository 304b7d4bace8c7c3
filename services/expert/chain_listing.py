"""EXPERT_SERVE_ON_CHAIN=1: publish on the chain where this service serves (Bittensor's
`serve_axon`), so that routers with ROUTER_DISCOVERY=chain find it without the Redis registry.

On Bittensor only this service's hotkey can change its listing, so no other miner can delete or
redirect it (on the local chain, whoever reaches its Redis can). At start, once the service answers
(after SERVING), the endpoint is published unless the chain already lists it for this hotkey:
Bittensor rate-limits `serve_axon` and charges for it. It is not watched afterwards. While the
chain is unreachable or the hotkey is not registered yet (a Kubernetes Job may register it a
minute later), the service keeps serving and tries again every `retry_s`; what can never be
published (a hostname on Bittensor, a bind address) fails the start instead (ExpertServer).

    listing = ChainListing(chain, identity, "10.0.0.5:50051")
    task = asyncio.create_task(listing.run())
"""

from __future__ import annotations

import asyncio
import logging

from subnet.chain.base import Chain
from subnet.chain.signing import serve_payload
from subnet.identity import Identity
from subnet.log_throttle import LogThrottle

log = logging.getLogger(__name__)


class ChainListing:
    def __init__(self, chain: Chain, identity: Identity, endpoint: str, retry_s: float = 30.0):
        if retry_s <= 0:
            raise ValueError(f"retry_s must be positive, got {retry_s}")
        self.chain, self.identity, self.endpoint, self.retry_s = chain, identity, endpoint, retry_s
        self.published = False   # the chain lists `endpoint` for this hotkey (by us or before us)
        self._failures = LogThrottle(300.0)

    def publish_once(self) -> None:
        """Publish unless the chain already lists this endpoint; `published` afterwards. Raises what
        the chain raises (ChainError: not registered, refused, unreachable)."""
        hotkey = self.identity.hotkey
        neuron = self.chain.metagraph().by_hotkey(hotkey)
        if neuron is not None and neuron.endpoint == self.endpoint:
            log.info("the chain already lists %s for hotkey %s", self.endpoint, hotkey)
        else:
            self.chain.serve(hotkey, self.endpoint, self.identity.sign(serve_payload(hotkey, self.endpoint)))
            log.info("published %s on the chain for hotkey %s", self.endpoint, hotkey)
        self.published = True

    async def run(self) -> None:
        """Try until published (the chain's calls run in a thread: they block)."""
        while not self.published:
            try:
                await asyncio.to_thread(self.publish_once)
            except Exception as e:  # the chain is remote: any failure means "try again later", never a crash
                self._failures.warning(log, "could not publish %s on the chain (trying again every %.0f s): %s: %s",
                                       self.endpoint, self.retry_s, type(e).__name__, str(e)[:300])
                await asyncio.sleep(self.retry_s)
