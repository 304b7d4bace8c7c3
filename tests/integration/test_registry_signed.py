"""Signed registry entries against a real redis-server: a reader that takes signed entries only
(the router with AUTH_MODE=on) keeps each hotkey's own entries and skips what anyone else wrote
in its name, altered, or replayed from long ago."""

import asyncio
import time

import pytest
import redis

import subnet.registry as registry_module
from subnet.identity import Identity
from subnet.registry import ExpertRegistry, Heartbeat, HeartbeatEntry, entry_payload, replica_key

pytestmark = pytest.mark.integration

HONEST, RIVAL = Identity.generate(), Identity.generate()


@pytest.fixture
def prefix():
    return f"test:signed:{time.monotonic_ns()}:"   # the session's Redis is shared


@pytest.fixture
def writer(redis_client, prefix):
    return ExpertRegistry(redis_client, ttl_s=30.0, prefix=prefix)


@pytest.fixture
def reader(redis_client, prefix):
    return ExpertRegistry(redis_client, prefix=prefix, require_signed=True)


def endpoints(reader, uid="0.1"):
    return [(r.endpoint, r.hotkey) for r in reader.replicas(uid)]


def test_a_signed_entry_is_read_and_an_unsigned_one_is_skipped(writer, reader):
    writer.register("0.1", "10.0.0.1:50051", load=2, signer=HONEST)
    writer.register("0.1", "10.0.0.2:50051", hotkey=HONEST.hotkey)           # no signature
    assert endpoints(reader) == [("10.0.0.1:50051", HONEST.hotkey)]
    assert len(ExpertRegistry(writer.redis, prefix=writer.prefix).replicas("0.1")) == 2   # a reader that does not ask
    assert reader.skipped == 1


def test_an_entry_in_a_rivals_name_is_skipped(writer, reader, redis_client):
    writer.register("0.1", "10.0.0.1:50051", signer=HONEST)
    # The rival lists a black hole under the honest hotkey, signing with its own key.
    writer.register("0.1", "10.0.0.9:50051", signer=RIVAL)
    redis_client.hset(replica_key("0.1", "10.0.0.9:50051", writer.prefix), "hotkey", HONEST.hotkey)
    assert endpoints(reader) == [("10.0.0.1:50051", HONEST.hotkey)]
    with pytest.raises(ValueError, match="signs it"):
        writer.register("0.1", "10.0.0.9:50051", hotkey=HONEST.hotkey, signer=RIVAL)


@pytest.mark.parametrize("field, value", [("load", "0"), ("version", "999"), ("updated_ms", "1"), ("sig", "00" * 64),
                                          ("sig", "not hex")])
def test_an_altered_entry_is_skipped(writer, reader, redis_client, field, value):
    writer.register("0.1", "10.0.0.1:50051", load=7, version=3, signer=HONEST)
    assert endpoints(reader) == [("10.0.0.1:50051", HONEST.hotkey)]
    redis_client.hset(replica_key("0.1", "10.0.0.1:50051", writer.prefix), field, value)
    assert endpoints(reader) == []


def test_an_old_signed_entry_replayed_is_skipped(writer, reader, redis_client):
    """A copy of an entry its owner stopped refreshing (the service is gone) must not keep drawing calls."""
    old_ms = int((time.time() - 2 * reader.max_age_s) * 1000)
    fields = {"uid": "0.1", "endpoint": "10.0.0.1:50051", "hotkey": HONEST.hotkey, "load": 0, "version": 0,
              "updated_ms": old_ms}
    fields["sig"] = HONEST.sign(entry_payload(**fields)).hex()
    redis_client.hset(replica_key("0.1", "10.0.0.1:50051", writer.prefix), mapping=fields)
    assert endpoints(reader) == []
    assert "signed more than" in next(iter(reader._logged.values()))[0]


def test_an_unchanged_entry_is_verified_once(writer, reader, monkeypatch):
    calls = []
    verify = registry_module.verify_signature
    monkeypatch.setattr(registry_module, "verify_signature", lambda *a: calls.append(1) or verify(*a))
    writer.register("0.1", "10.0.0.1:50051", signer=HONEST)
    for _ in range(3):
        assert len(reader.replicas("0.1")) == 1
    assert len(calls) == 1
    writer.register("0.1", "10.0.0.1:50051", load=1, signer=HONEST)   # a heartbeat: new fields, new signature
    assert len(reader.replicas("0.1")) == 1 and len(calls) == 2


def test_a_heartbeat_with_a_signer_signs_every_beat(writer, reader):
    async def run():
        beat = Heartbeat(writer, [HeartbeatEntry("0.1", "10.0.0.1:50051", load=lambda: 5)], hotkey=HONEST.hotkey,
                         interval_s=0.05, signer=HONEST)
        await beat.start()
        await asyncio.sleep(0.2)
        found = reader.replicas("0.1")
        await beat.stop()
        return found, beat.beats
    found, beats = asyncio.run(run())
    assert beats >= 2 and [(r.endpoint, r.load, r.hotkey) for r in found] == [("10.0.0.1:50051", 5, HONEST.hotkey)]


def test_each_skipped_entry_is_reported_with_its_category(redis_client, prefix, writer):
    """What router_registry_entries_skipped_total{reason} counts (and MoeRegistryEntriesRefused alerts on)."""
    seen = []
    reader = ExpertRegistry(redis_client, prefix=prefix, require_signed=True, on_skip=seen.append)
    writer.register("0.1", "10.0.0.1:50051", signer=HONEST)                       # kept
    writer.register("0.1", "10.0.0.2:50051", hotkey=HONEST.hotkey)               # unsigned
    writer.register("0.1", "10.0.0.3:50051", signer=RIVAL)
    redis_client.hset(replica_key("0.1", "10.0.0.3:50051", prefix), "hotkey", HONEST.hotkey)   # forged
    old = {"uid": "0.1", "endpoint": "10.0.0.4:50051", "hotkey": HONEST.hotkey, "load": 0, "version": 0,
           "updated_ms": int((time.time() - 2 * reader.max_age_s) * 1000)}
    redis_client.hset(replica_key("0.1", "10.0.0.4:50051", prefix),
                      mapping={**old, "sig": HONEST.sign(entry_payload(**old)).hex()})     # stale
    redis_client.hset(replica_key("0.1", "10.0.0.5:50051", prefix), mapping={"uid": "0.1"})   # malformed
    assert [r.endpoint for r in reader.replicas("0.1")] == ["10.0.0.1:50051"]
    assert sorted(seen) == ["forged", "malformed", "stale", "unsigned"]
    reader.replicas("0.1")
    assert len(seen) == 8   # once per entry and read


def test_the_router_counts_what_it_leaves_out_in_its_metrics():
    """The wiring behind router_registry_entries_skipped_total: a router (AUTH_MODE=on) reading a
    registry with one unsigned entry, on a Redis of its own (the default key prefix)."""
    from services.router.config import RouterConfig
    from services.router.remote_model import RemoteParts
    from subnet.dev.redis_server import RedisServer
    from subnet.envconfig import from_env

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        ExpertRegistry(client).register("0.1", "10.0.0.1:50051", hotkey=HONEST.hotkey)        # unsigned
        ExpertRegistry(client).register("0.1", "10.0.0.2:50051", signer=HONEST)
        parts = RemoteParts.connect(from_env(RouterConfig, {"REDIS_URL": server.url, "ROUTER_FOLLOW_SCORES": "0"}),
                                    identity=RIVAL)
        try:
            assert [r.endpoint for r in parts.replicas.replicas("0.1")] == ["10.0.0.2:50051"]
            assert parts.metrics.registry_skipped.labels("unsigned")._value.get() >= 1
            assert parts.metrics.registry_skipped.labels("forged")._value.get() == 0
        finally:
            parts.close()


@pytest.mark.parametrize("field, value", [("sig", "ab" * 5000), ("uid", "9" * 100), ("endpoint", "h" * 400 + ":1"),
                                          ("hotkey", "5" * 1000)])
def test_oversized_fields_are_skipped_and_not_remembered(writer, reader, redis_client, field, value):
    """Whatever a miner writes, a reader keeps at most a small payload per entry in its cache."""
    key = replica_key("0.1", "10.0.0.1:50051", writer.prefix)
    writer.register("0.1", "10.0.0.1:50051", signer=HONEST)
    if field == "uid":   # a huge uid lives under a key of its own
        key = replica_key(value, "10.0.0.1:50051", writer.prefix)
        redis_client.hset(key, mapping={"uid": value, "endpoint": "10.0.0.1:50051", "hotkey": HONEST.hotkey,
                                        "sig": "00" * 64})
        assert reader.replicas(value) == []
    else:
        redis_client.hset(key, field, value)
        assert reader.replicas("0.1") == []
    assert all(len(payload) < 1024 for payload, _ in reader._verified)
