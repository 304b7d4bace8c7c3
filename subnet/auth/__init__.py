"""Signed requests between services (the scheme: protos/subnet/wire/v1/tensor.proto).

Sender: `SigningChannel(channel, identity, receiver_hotkey)` under any generated stub.
Receiver: `build_server_auth(AuthConfig, identity, ...)` -> `ServerAuth`, whose
interceptor verifies every protected method before the servicer runs.

    payload.py   metadata keys, the signed payload, sign_metadata
    verify.py    Verifier: metadata -> window -> signature -> nonce -> policy
    nonces.py    seen nonces: in memory (bounded) or Redis (SET NX PX)
    policy.py    who may call: AllowList, ChainPolicy, AnyOf, Anyone
    server.py    ServerAuth: gRPC interceptors (aio and sync), rejection log and counter
    client.py    SigningChannel: serialize once, sign, send the bytes
    sessions.py  moe-frames connections: one signed X25519 Open, then an HMAC and a seq per call
    config.py    AuthConfig (AUTH_*), service_identity, build_server_auth
"""

from subnet.auth.client import SigningChannel
from subnet.auth.config import AuthConfig, build_server_auth, service_identity
from subnet.auth.nonces import MemoryNonceStore, NonceStoreError, RedisNonceStore
from subnet.auth.payload import sign_metadata, signing_payload
from subnet.auth.policy import AllowList, AnyOf, Anyone, ChainPolicy
from subnet.auth.server import ServerAuth
from subnet.auth.verify import Rejection, Verifier

__all__ = ["AllowList", "AnyOf", "Anyone", "AuthConfig", "ChainPolicy", "MemoryNonceStore", "NonceStoreError",
           "RedisNonceStore", "Rejection", "ServerAuth", "SigningChannel", "Verifier", "build_server_auth",
           "service_identity", "sign_metadata", "signing_payload"]
