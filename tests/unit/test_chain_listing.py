"""EXPERT_SERVE_ON_CHAIN's listing: published once, signed by the service's hotkey, not re-sent
while the chain already lists it, retried while the chain refuses, and published again when a
later check finds it gone (a stand-in chain: the
real LocalChain path runs in tests/integration/test_chain_discovery.py)."""

import asyncio

import pytest

from services.expert.chain_listing import ChainListing
from subnet.chain.base import ChainError, Metagraph, Neuron
from subnet.chain.signing import serve_payload
from subnet.identity import Identity, verify_signature

ME = Identity.generate()


class Chain:
    def __init__(self, endpoint: str = "", refusals: int = 0):
        self.endpoint, self.refusals, self.served, self.registered = endpoint, refusals, [], True

    def metagraph(self):
        neurons = (Neuron(0, ME.hotkey, endpoint=self.endpoint),) if self.registered else ()
        return Metagraph(block=1, neurons=neurons)

    def serve(self, hotkey, endpoint, signature):
        if not self.registered:
            raise ChainError(f"hotkey {hotkey} is not registered")
        if self.refusals:
            self.refusals -= 1
            raise ChainError(f"hotkey {hotkey} is not registered")
        assert verify_signature(hotkey, serve_payload(hotkey, endpoint), signature)
        self.served.append((hotkey, endpoint))
        self.endpoint = endpoint


def test_publishes_a_signed_listing_once():
    chain = Chain()
    listing = ChainListing(chain, ME, "10.0.0.5:50051")
    listing.publish_once()
    assert listing.published
    assert chain.served == [(ME.hotkey, "10.0.0.5:50051")]
    ChainListing(chain, ME, "10.0.0.5:50051").publish_once()
    assert len(chain.served) == 1   # already listed: no second extrinsic (Bittensor charges and rate-limits)


def test_a_moved_service_publishes_its_new_endpoint():
    chain = Chain(endpoint="10.0.0.5:50051")
    ChainListing(chain, ME, "10.0.0.6:50051").publish_once()
    assert chain.served == [(ME.hotkey, "10.0.0.6:50051")]


def test_retries_while_the_chain_refuses_and_logs_it(caplog):
    chain = Chain(refusals=2)
    listing = ChainListing(chain, ME, "10.0.0.5:50051", retry_s=0.01, check_s=0)   # check_s=0: run() returns
    with caplog.at_level("WARNING"):
        asyncio.run(asyncio.wait_for(listing.run(), 10))
    assert listing.published and chain.served == [(ME.hotkey, "10.0.0.5:50051")]
    assert "not registered" in caplog.text and caplog.text.count("could not publish") == 1   # throttled


class Unreadable(Chain):
    """The chain's metagraph read fails `failures` times, then works."""

    def __init__(self, failures: int, **kwargs):
        super().__init__(**kwargs)
        self.failures = failures

    def metagraph(self):
        if self.failures:
            self.failures -= 1
            raise ChainError("chain unreachable")
        return super().metagraph()


def test_a_deleted_or_redirected_listing_is_published_again_at_the_next_check(caplog):
    for found, expect in (("", "it lists no endpoint"), ("10.9.9.9:1", "it lists '10.9.9.9:1'")):
        chain, states = Chain(), []
        listing = ChainListing(chain, ME, "10.0.0.5:50051", check_s=3600, on_listed=states.append)
        listing.publish_once()
        assert listing.check_once() and listing.published   # still listed: nothing sent
        chain.endpoint = found   # a writer of the local chain's Redis deleted or redirected it
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert not listing.check_once()
        assert not listing.published and expect in caplog.text
        listing.publish_once()
        assert chain.endpoint == "10.0.0.5:50051"
        assert chain.served == [(ME.hotkey, "10.0.0.5:50051")] * 2
        assert states == [True, True, False, True]


def test_a_pruned_hotkey_is_listed_again_once_registered_again(caplog):
    chain, states = Chain(), []
    listing = ChainListing(chain, ME, "10.0.0.5:50051", check_s=3600, on_listed=states.append)
    listing.publish_once()
    chain.registered, chain.endpoint = False, ""   # pruned: the neuron and its axon are gone
    with caplog.at_level("WARNING"):
        assert not listing.check_once()
    assert "the hotkey is not registered" in caplog.text and states[-1] is False
    with pytest.raises(ChainError, match="not registered"):   # run() retries this every retry_s
        listing.publish_once()
    chain.registered = True
    listing.publish_once()
    assert chain.served == [(ME.hotkey, "10.0.0.5:50051")] * 2 and states[-1] is True


def test_the_chains_own_spelling_of_an_address_is_no_change():
    """Bittensor stores the IP as a number and reads it back in its short form: that is the same
    listing, not one to publish again (each serve_axon is paid for and rate-limited)."""
    chain = Chain()
    listing = ChainListing(chain, ME, "[2001:DB8:0:0::1]:50051", check_s=3600)
    listing.publish_once()
    chain.endpoint = "[2001:db8::1]:50051"
    assert listing.check_once()
    ChainListing(chain, ME, "[2001:DB8:0:0::1]:50051").publish_once()
    assert len(chain.served) == 1


def test_run_keeps_watching_and_survives_unreadable_checks():
    """run() publishes, then checks every check_s: a failed read changes nothing, a lost listing is
    published again, and the loop never ends by itself."""
    chain = Unreadable(failures=0)
    published, states = [], []
    listing = ChainListing(chain, ME, "10.0.0.5:50051", retry_s=0.01, check_s=0.01,
                           on_published=lambda: published.append(chain.endpoint), on_listed=states.append)

    async def scenario():
        task = asyncio.create_task(listing.run())
        while not listing.published:
            await asyncio.sleep(0.005)
        chain.failures = 3          # three checks cannot read the chain: the listing is kept
        seen = len(states)
        while chain.failures:
            await asyncio.sleep(0.005)
        assert listing.published and len(chain.served) == 1
        assert False not in states[seen:]   # an unreadable chain says nothing about the listing
        chain.endpoint = ""         # deleted
        while len(chain.served) < 2:
            await asyncio.sleep(0.005)
        assert not task.done()
        task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert chain.served == [(ME.hotkey, "10.0.0.5:50051")] * 2 and len(published) == 2


def test_check_s_0_publishes_and_stops_watching():
    chain = Chain()
    asyncio.run(asyncio.wait_for(ChainListing(chain, ME, "10.0.0.5:50051", check_s=0).run(), 10))
    assert chain.served == [(ME.hotkey, "10.0.0.5:50051")]


def test_the_service_refuses_to_start_with_a_listing_it_could_never_publish(tmp_path, monkeypatch):
    """Found out at start, with what to set, instead of retried every 30 s for ever."""
    import socket

    import pytest

    # A bind-all EXPERT_HOST publishes the address this host's name resolves to: here, as on many
    # a laptop, a loopback one.
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")

    from services.expert.config import ExpertConfig
    from services.expert.server import ExpertServer, StartupError
    from subnet.envconfig import ConfigError, from_env

    base = {"EXPERT_UIDS": "0.0", "EXPERT_DIM": "8", "EXPERT_INTER_DIM": "16", "EXPERT_PORT": "0",
            "EXPERT_SERVE_ON_CHAIN": "1", "AUTH_ALLOWLIST": ME.hotkey, "CHAIN": "local",
            "CHAIN_REDIS_URL": "redis://127.0.0.1:1/0"}
    cases = [({"AUTH_MODE": "off"}, None, "needs AUTH_MODE=on"),
             ({"EXPERT_HOST": "0.0.0.0"}, ME, "set EXPERT_ADVERTISE_ENDPOINT"),
             ({"EXPERT_ADVERTISE_ENDPOINT": "0.0.0.0:50051"}, ME, "bind address"),
             # Bittensor stores IP addresses: a hostname could never be published there.
             ({"CHAIN": "bittensor", "CHAIN_NETUID": "7", "EXPERT_ADVERTISE_ENDPOINT": "expert-0:50051"}, ME,
              "is a hostname")]
    async def start_and_stop(server):   # a start that wrongly succeeds must not leave a server running
        try:
            await server.start()
        finally:
            await server.stop(grace_s=0)

    for env, identity, message in cases:
        server = ExpertServer(from_env(ExpertConfig, {**base, **env}), identity=identity)
        with pytest.raises(StartupError, match=message):
            asyncio.run(start_and_stop(server))
    # An endpoint that is no endpoint at all is refused with the configuration, chain or not.
    for endpoint, message in (("expert 0:50051", "endpoint must be 'host:port'"), ("unix:50051", "not a gRPC scheme")):
        with pytest.raises(ConfigError, match=message):
            from_env(ExpertConfig, {**base, "EXPERT_ADVERTISE_ENDPOINT": endpoint})
