"""The embedded SeaweedFS server (subnet.dev.s3_server) holds as many buckets as a test session
makes. Each bucket is a collection with volumes of its own; mini's default volume limit is
free disk / 1 GiB, which once failed CI with a 500 on the 36th bucket's first write."""

from __future__ import annotations

import json
import urllib.request
import uuid

from tests.integration.s3_fixtures import s3_server  # noqa: F401  (fixture)


def test_volume_limit_does_not_depend_on_free_disk(s3_server):  # noqa: F811
    with urllib.request.urlopen(f"http://{s3_server.host}:{s3_server.master_port}/dir/status", timeout=10) as r:
        topology = json.load(r)["Topology"]
    assert topology["Max"] >= 1000, topology


def test_forty_fresh_buckets_each_take_a_write(object_store):
    for i in range(40):
        store = object_store.for_bucket(f"test-{uuid.uuid4().hex[:16]}")
        store.ensure_bucket()
        store.put_bytes("probe/config.json", json.dumps({"bucket": i}).encode())
        assert json.loads(store.get_bytes("probe/config.json")) == {"bucket": i}
