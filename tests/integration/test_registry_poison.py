"""Hostile registry entries against a real redis-server: every miner can write to the registry's
Redis, so one bad key must not hide the other experts from a read or from the router, and must
not flood the logs. A Redis outage is logged once, not once per refresh."""

import logging
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import subnet.registry
from services.router.replicas import REGISTRY_DOWN_LOG_S, ReplicaSet
from subnet.dev.redis_server import RedisServer
from subnet.registry import ExpertRegistry
from tests.manual_clock import ManualClock

pytestmark = pytest.mark.integration

# Each writes one bad entry at `key` (an expert's key: a read of uid "0.1" matches it).
POISONS = {
    "string": lambda r, key: r.set(key, "x"),
    "list": lambda r, key: r.rpush(key, "x"),
    "value not utf-8": lambda r, key: r.hset(key, mapping={"uid": "0.1", "endpoint": b"\xff"}),
    "name not utf-8": lambda r, key: r.hset(key, mapping={"uid": "0.1", "endpoint": "e", b"\xfe": "x"}),
    "no uid": lambda r, key: r.hset(key, mapping={"endpoint": "e"}),
    "load not a number": lambda r, key: r.hset(key, mapping={"uid": "0.1", "endpoint": "e", "load": "many"}),
    "negative load": lambda r, key: r.hset(key, mapping={"uid": "0.1", "endpoint": "e", "load": "-1000000"}),
    # Under expert 0.1's key, claiming to be expert 0.2 (with its own endpoint, so only the key gives it away).
    "claims another expert": lambda r, key: r.hset(key, mapping={"uid": "0.2", "endpoint": "zz"}),
}


@pytest.fixture
def registry(redis_client):
    prefix = f"test:{time.monotonic_ns()}:"  # the session's Redis is shared: stay in our own keyspace
    return ExpertRegistry(redis_client, ttl_s=60.0, prefix=prefix)


def endpoints(registry: ExpertRegistry) -> dict[str, list[str]]:
    return {uid: [r.endpoint for r in reps] for uid, reps in registry.all_replicas().items()}


@pytest.mark.parametrize("poison", POISONS)
def test_a_bad_entry_is_skipped_counted_and_hides_no_other(registry, redis_client, poison):
    registry.register("0.1", "h:1", load=3)
    POISONS[poison](redis_client, registry.prefix + "0.1:zz")
    registry.register("0.2", "h:2")  # joins after the bad entry was written
    assert [r.endpoint for r in registry.replicas("0.1")] == ["h:1"]
    assert endpoints(registry) == {"0.1": ["h:1"], "0.2": ["h:2"]}
    assert registry.skipped == 2  # once per read


def test_bad_entries_are_logged_once_short_and_without_traceback(registry, redis_client, caplog):
    caplog.set_level(logging.INFO, logger="subnet.registry")
    huge = "x" * 1_000_000
    redis_client.hset(registry.prefix + "0.1:huge", mapping={"uid": "0.1", "endpoint": "e", "load": huge})
    redis_client.set(registry.prefix + "0.1:" + huge, "x")  # a huge key name, not a hash
    registry.register("0.1", "h:1")
    for _ in range(3):
        assert endpoints(registry) == {"0.1": ["h:1"]}
    lines = [r for r in caplog.records if r.name == "subnet.registry"]
    assert len(lines) == 2  # one per bad key, not one per read
    assert all(r.exc_info is None and len(r.getMessage()) < 1000 for r in lines)
    # The same key turning bad in another way is news: logged again.
    redis_client.delete(registry.prefix + "0.1:huge")
    redis_client.set(registry.prefix + "0.1:huge", "x")
    assert endpoints(registry) == {"0.1": ["h:1"]}
    assert len([r for r in caplog.records if r.name == "subnet.registry"]) == 3


def test_many_new_bad_entries_cost_a_bounded_number_of_lines(registry, redis_client, caplog):
    caplog.set_level(logging.INFO, logger="subnet.registry")
    for i in range(100):
        redis_client.set(f"{registry.prefix}0.1:bad{i}", "x")
    registry.register("0.1", "h:1")
    assert endpoints(registry) == {"0.1": ["h:1"]}
    lines = [r.getMessage() for r in caplog.records if r.name == "subnet.registry"]
    assert 1 < len(lines) <= 20 and "more" in lines[-1]
    assert registry.skipped == 100


def test_router_sees_new_experts_despite_a_bad_entry(registry, redis_client, caplog):
    caplog.set_level(logging.INFO, logger="subnet.registry")
    caplog.set_level(logging.INFO, logger="services.router.replicas")
    registry.register("0.0", "h:2")
    replicas = ReplicaSet(registry)
    replicas.refresh()
    redis_client.set(registry.prefix + "zz", "x")
    redis_client.hset(registry.prefix + "zy", mapping={"uid": "0.1", "endpoint": b"\xff"})
    registry.register("0.1", "h:1")  # a new expert joins after the poison
    for _ in range(3):
        replicas.refresh()
    assert replicas.choose("0.1").endpoint == "h:1"
    assert replicas.choose("0.0").endpoint == "h:2"
    assert len(caplog.records) == 2 and all(r.exc_info is None for r in caplog.records)


def test_router_logs_a_redis_outage_once_keeps_routing_and_says_when_it_is_back(caplog):
    caplog.set_level(logging.INFO, logger="services.router.replicas")
    server = RedisServer(port=0).start()
    # No client retries: each refresh of the outage fails at once (the logging is under test).
    client = redis.Redis.from_url(server.url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                  retry=Retry(NoBackoff(), 0))
    clock = ManualClock(1000.0)
    try:
        registry = ExpertRegistry(client, ttl_s=60.0)
        registry.register("0.1", "h:1")
        replicas = ReplicaSet(registry, clock=clock, refresh_s=2.0)
        replicas.refresh()
        server.stop()
        for _ in range(5):
            clock.now += 2.0
            replicas.refresh()
            assert replicas.choose("0.1").endpoint == "h:1"  # the last snapshot, while Redis is away
        (down,) = caplog.records
        assert down.levelno == logging.WARNING and down.exc_info is None and "unreachable" in down.getMessage()
        clock.now += REGISTRY_DOWN_LOG_S
        replicas.refresh()
        assert len(caplog.records) == 2 and "still unreachable" in caplog.records[1].getMessage()

        server = RedisServer(port=server.port).start()  # back, empty, on the same address
        registry.register("0.2", "h:2")
        clock.now += 2.0
        replicas.refresh()
        assert replicas.choose("0.2").endpoint == "h:2"
        back = caplog.records[2]
        assert len(caplog.records) == 3 and back.levelno == logging.INFO and "again" in back.getMessage()
    finally:
        client.close()
        server.stop()


def test_a_bad_entry_still_there_is_logged_again_after_the_interval(registry, redis_client, caplog, monkeypatch):
    monkeypatch.setattr(subnet.registry, "SKIP_LOG_INTERVAL_S", 0.0)  # every read is past the interval
    caplog.set_level(logging.INFO, logger="subnet.registry")
    redis_client.set(registry.prefix + "0.1:zz", "x")
    for _ in range(2):
        assert endpoints(registry) == {}
    assert len([r for r in caplog.records if r.name == "subnet.registry"]) == 2


@pytest.mark.parametrize("endpoint", ["unix:50051", "unix-abstract:4242", "dns:50051", "h:0", "h", "a b:1",
                                      "x/y:1"])
def test_entries_whose_endpoint_is_not_host_and_port_are_skipped(registry, endpoint):
    """The router dials what an entry says: "unix:50051" would reach a unix socket on the router's
    own host. Such entries are skipped like any malformed one; the rest are still read."""
    registry.register("0.0", "h:2")
    registry.register("0.1", endpoint)
    assert {uid: [r.endpoint for r in reps] for uid, reps in registry.all_replicas().items()} == {"0.0": ["h:2"]}
    assert registry.skipped == 1
