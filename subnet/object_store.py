"""A small byte-oriented interface to one S3 bucket (MinIO in deployments, SeaweedFS in tests).

    store = ObjectStore(from_env(S3Config))  # S3_ENDPOINT, S3_ACCESS_KEY, ... (see S3Config)
    store.ensure_bucket()
    store.put_bytes("checkpoints/trunk/3/config.json", b"{}")
    data = store.get_bytes("checkpoints/trunk/3/config.json")   # StoreError if over S3_MAX_OBJECT_MB

It moves bytes and nothing else: what the bytes mean and whether they can be trusted is
subnet.checkpoints' job. Every failure (network, auth, missing object, object too large) is
a StoreError whose message names the endpoint, the bucket and the key.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from subnet.envconfig import env

MB = 1024 * 1024
_CHUNK = 1024 * 1024  # download granularity; also bounds how far a read may overshoot a limit
_NOT_FOUND = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"}
# What a minio call raises on a bad answer, a network failure or an invalid bucket/key name.
_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError)


@dataclasses.dataclass(frozen=True)
class S3Config:
    endpoint: str = env("S3_ENDPOINT", "", "S3 API address as host:port, e.g. minio:9000 (no scheme); empty = no "
                                           "object store (nothing is published)")
    access_key: str = env("S3_ACCESS_KEY", "", "S3 access key; empty = anonymous requests")
    secret_key: str = env("S3_SECRET_KEY", "", "S3 secret key")
    bucket: str = env("S3_BUCKET", "moe-subnet", "bucket holding checkpoints/")
    secure: bool = env("S3_SECURE", False, "1 = HTTPS to the S3 endpoint")
    max_object_mb: float = env("S3_MAX_OBJECT_MB", 1024.0,
                               "largest object a read accepts; larger ones are refused before download")
    connect_timeout_s: float = env("S3_CONNECT_TIMEOUT_S", 5.0, "TCP connect timeout of each S3 request")
    read_timeout_s: float = env("S3_READ_TIMEOUT_S", 60.0,
                                "longest wait for the next bytes of a response; a stalled S3 fails, not hangs")

    signers: tuple[str, ...] = env("CHECKPOINT_SIGNERS", (),
                                   "ss58 hotkeys whose signed checkpoints a service may start from (s3:// URLs); "
                                   "empty = the chain's validators and the service's own hotkey")

    def __post_init__(self) -> None:
        if "://" in self.endpoint or "/" in self.endpoint:
            raise ValueError(f"S3_ENDPOINT={self.endpoint!r} must be host:port without scheme or path "
                             f"(use S3_SECURE=1 for HTTPS)")
        if self.endpoint.startswith("["):   # [IPv6]:port
            rest = self.endpoint.partition("]")[2]
            port = rest[1:] if rest.startswith(":") else None
        else:
            port = self.endpoint.rpartition(":")[2] if ":" in self.endpoint else None
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"S3_ENDPOINT={self.endpoint!r}: the port {port!r} must be a number in 1..65535")
        if bool(self.access_key) != bool(self.secret_key):
            raise ValueError("S3_ACCESS_KEY and S3_SECRET_KEY must be set together (or both empty)")
        if self.max_object_mb <= 0:
            raise ValueError(f"S3_MAX_OBJECT_MB={self.max_object_mb} must be positive")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError(f"S3_CONNECT_TIMEOUT_S={self.connect_timeout_s} and S3_READ_TIMEOUT_S="
                             f"{self.read_timeout_s} must be positive")

    def __repr__(self) -> str:  # configs get logged; the secret must not be
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["secret_key"] = "***" if self.secret_key else ""
        return f"S3Config({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)

    @property
    def max_object_bytes(self) -> int:
        return int(self.max_object_mb * MB)


class StoreError(RuntimeError):
    """An S3 operation failed; the message names endpoint, bucket and key."""


class ObjectNotFoundError(StoreError):
    """The key (or the bucket) does not exist."""


class ObjectTooLargeError(StoreError):
    """The object is larger than the read limit; nothing was downloaded."""


class ObjectStore:
    """Bytes in and out of one bucket. Does not interpret, cache or verify them."""

    def __init__(self, config: S3Config, http_client: urllib3.PoolManager | None = None):
        if not config.enabled:
            raise StoreError("no object store configured: set S3_ENDPOINT (and S3_ACCESS_KEY, S3_SECRET_KEY)")
        self.config = config
        # minio's default pool waits up to 5 minutes per read and retries 5 times: a stalled S3
        # would hold a service's start-up or a validator's round for half an hour.
        self._http = http_client or urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=config.connect_timeout_s, read=config.read_timeout_s),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
            maxsize=10)
        self._client = Minio(config.endpoint, access_key=config.access_key or None,
                             secret_key=config.secret_key or None, secure=config.secure, http_client=self._http)

    @property
    def bucket(self) -> str:
        return self.config.bucket

    def for_bucket(self, bucket: str) -> ObjectStore:
        """The same endpoint and credentials, another bucket (shares the connection pool)."""
        return ObjectStore(dataclasses.replace(self.config, bucket=bucket), http_client=self._http)

    def where(self, key: str | None = None) -> str:
        base = f"s3://{self.bucket}" + (f"/{key}" if key else "")
        return f"{base} at {self.config.endpoint}"

    def _error(self, action: str, key: str | None, e: Exception) -> StoreError:
        if isinstance(e, S3Error) and e.code in _NOT_FOUND:
            return ObjectNotFoundError(f"{action} {self.where(key)}: not found ({e.code})")
        detail = f"{e.code}: {e.message}" if isinstance(e, S3Error) else f"{type(e).__name__}: {e}"
        return StoreError(f"{action} {self.where(key)} failed: {detail}")

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (idempotent; a concurrent creator is fine)."""
        try:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)
        except S3Error as e:
            if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error("create bucket", None, e) from e
        except _ERRORS as e:
            raise self._error("create bucket", None, e) from e

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        try:
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        except _ERRORS as e:
            raise self._error("put", key, e) from e

    def put_file(self, key: str, path: str | Path, content_type: str = "application/octet-stream") -> None:
        try:
            self._client.fput_object(self.bucket, key, str(path), content_type=content_type)
        except _ERRORS as e:
            raise self._error(f"put {path} to", key, e) from e

    def size(self, key: str) -> int:
        """The object's size in bytes (a HEAD request; nothing is downloaded)."""
        try:
            return int(self._client.stat_object(self.bucket, key).size or 0)
        except _ERRORS as e:
            raise self._error("stat", key, e) from e

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFoundError:
            return False
        return True

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes. One larger than `max_bytes` (default S3_MAX_OBJECT_MB) is refused
        after a HEAD, before any download; the download itself is also cut at the limit, in case
        the object grew in between."""
        limit = self.config.max_object_bytes if max_bytes is None else max_bytes
        size = self.size(key)
        if size > limit:
            raise ObjectTooLargeError(f"get {self.where(key)}: object is {size} bytes, over the limit of "
                                      f"{limit} bytes; refused before download")
        response = None
        try:
            response = self._client.get_object(self.bucket, key)
            buf = bytearray()
            for chunk in response.stream(_CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise ObjectTooLargeError(f"get {self.where(key)}: object grew past the limit of "
                                              f"{limit} bytes while downloading")
            return bytes(buf)
        except StoreError:
            raise
        except _ERRORS as e:
            raise self._error("get", key, e) from e
        finally:
            if response is not None:
                response.close()
                response.release_conn()

    def list(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (recursively), sorted."""
        try:
            return sorted(obj.object_name for obj in self._client.list_objects(self.bucket, prefix=prefix,
                                                                                recursive=True)
                          if obj.object_name is not None)
        except _ERRORS as e:
            raise self._error("list", prefix, e) from e

    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error (S3 semantics)."""
        try:
            self._client.remove_object(self.bucket, key)
        except _ERRORS as e:
            raise self._error("delete", key, e) from e
