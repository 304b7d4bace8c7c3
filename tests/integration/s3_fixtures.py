"""S3 fixtures (imported by tests/integration/conftest.py).

s3_server (session)
    A real SeaweedFS S3 API (`weed mini`, subnet.dev.s3_server.S3Server) on free loopback ports,
    shared by the whole session. Attributes: `.endpoint` ("127.0.0.1:<port>"), `.access_key`,
    `.secret_key`, `.env(bucket=None)` -> the S3_* variables for a subprocess.

object_store (function)
    A subnet.object_store.ObjectStore on `s3_server` with a fresh, empty bucket of its own
    (`object_store.bucket`), so tests never see each other's objects. Buckets disappear with
    the server at the end of the session.
"""

from __future__ import annotations

import uuid

import pytest

from subnet.dev.s3_server import S3Server
from subnet.envconfig import from_env
from subnet.object_store import ObjectStore, S3Config


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server(port=0).start()
    yield server
    server.stop()


@pytest.fixture
def object_store(s3_server) -> ObjectStore:
    # S3 bucket names: 3-63 lowercase letters, digits and hyphens.
    config = from_env(S3Config, s3_server.env(bucket=f"test-{uuid.uuid4().hex[:16]}"))
    store = ObjectStore(config)
    store.ensure_bucket()
    return store
