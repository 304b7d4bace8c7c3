"""subnet.registry against a real redis-server: hashes, TTL, SCAN-based reads, the heartbeat."""

import asyncio
import time

import pytest

from subnet.dev.redis_server import RedisServer, RedisServerError
from subnet.registry import ExpertRegistry, Heartbeat, HeartbeatEntry, Replica, replica_key

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(redis_client):
    prefix = f"test:{time.monotonic_ns()}:"  # the session's Redis is shared: stay in our own keyspace
    return ExpertRegistry(redis_client, ttl_s=1.0, prefix=prefix)


def test_register_read_deregister(registry, redis_client):
    registry.register("0.1", "10.0.0.1:5000", hotkey="hk", load=12, version=3)
    registry.register("0.1", "10.0.0.2:5000", load=4)
    registry.register("0.10", "10.0.0.3:5000")  # "0.1" must not match "0.10"
    key = replica_key("0.1", "10.0.0.1:5000", registry.prefix)
    assert redis_client.hget(key, "hotkey") == b"hk"
    assert 0 < redis_client.pttl(key) <= 1000
    replicas = registry.replicas("0.1")
    assert [r.endpoint for r in replicas] == ["10.0.0.2:5000", "10.0.0.1:5000"]  # least loaded first
    first = replicas[1]
    assert isinstance(first, Replica) and (first.uid, first.hotkey, first.load, first.version) == ("0.1", "hk", 12, 3)
    assert abs(first.updated_ms - time.time() * 1000) < 5000
    assert sorted(registry.all_replicas()) == ["0.1", "0.10"]
    registry.deregister("0.1", "10.0.0.1:5000")
    assert [r.endpoint for r in registry.replicas("0.1")] == ["10.0.0.2:5000"]


def test_entries_expire_without_heartbeat_and_malformed_ones_are_skipped(registry, redis_client):
    registry.register("1.0", "h:1")
    redis_client.hset(registry.prefix + "1.0:junk", mapping={"uid": "1.0", "endpoint": "junk", "load": "many"})
    assert [r.endpoint for r in registry.replicas("1.0")] == ["h:1"]
    time.sleep(1.2)
    assert registry.replicas("1.0") == []


def test_heartbeat_keeps_entries_alive_reports_load_and_deregisters(registry):
    load = {"n": 5}

    async def scenario():
        hb = Heartbeat(registry, [HeartbeatEntry("2.0", "h:2", load=lambda: load["n"], version=lambda: 7),
                                  ("2.1", "h:2", lambda: 0)], hotkey="hk")
        await hb.start()
        assert [r.uid for r in registry.replicas("2.0")] == ["2.0"]  # registered by start() itself
        load["n"] = 9
        await asyncio.sleep(1.5)  # past the TTL: only the heartbeat keeps them
        (replica,) = registry.replicas("2.0")
        assert (replica.load, replica.version, replica.hotkey) == (9, 7, "hk")
        assert len(registry.replicas("2.1")) == 1 and hb.beats >= 3
        await hb.stop(deregister=True)
        assert registry.all_replicas() == {}

    asyncio.run(scenario())


def test_embedded_redis_refuses_a_port_in_use(redis_server):
    with pytest.raises(RedisServerError, match=f"port {redis_server.port} .* is in use"):
        RedisServer(port=redis_server.port).start()
