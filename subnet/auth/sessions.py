"""Authenticated sessions on a moe-frames connection: one signed key exchange, then a MAC per call.

Why: an sr25519 signature on every call costs the receiver about 155 µs of CPU and the sender
about 65 µs (verify 45 µs, sign 20 µs, plus the payload around them); a decode step makes about
six calls per token. A moe-frames connection carries one call after another between the same two
processes, so it can carry a session instead:

1. Open (the connection's first call, SESSION_METHOD): an ordinary signed request (subnet.auth:
   nonce, timestamp, receiver, policy) whose body is the caller's fresh X25519 public key. The
   receiver answers with its own fresh X25519 public key. Both derive the session key from the
   shared secret, both public keys and both hotkeys (`_session_key`). Neither private key outlives
   the exchange; the key lives in the two processes' memory only, for the connection's life.
2. Every later call on that connection carries, instead of the four signature entries,
   SEQ_KEY (1, 2, 3, ... on this connection) and MAC_KEY = HMAC-SHA256(key, domain, method, seq,
   sha256 of the body). The receiver takes a call only with the next seq and a MAC that matches,
   and asks the policy about the session's hotkey again on every call (a hotkey dropped from the
   metagraph or the allowlist is refused at its next call, as before).

What this keeps: a call is bound to its body and method and to this receiver (the key is this
pair's); a recorded call cannot be replayed (seq), nor a recorded connection (the Open's nonce and
timestamp, and a fresh receiver key per connection); someone on the path who can read and inject
TCP cannot forge a call (the key never crossed the wire). What it does not add: answers stay
unsigned and nothing is encrypted, as over gRPC without TLS.

A caller without a session on a connection (the receiver does not offer sessions: auth off, or
an older service answers UNIMPLEMENTED) signs every call as before. gRPC calls are always signed
per call: a gRPC channel is not one connection one caller owns.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from Crypto.Protocol.DH import import_x25519_public_key, key_agreement
from Crypto.PublicKey import ECC

from subnet.auth.client import SigningChannel
from subnet.auth.payload import HOTKEY_KEY, sign_metadata
from subnet.auth.policy import Policy
from subnet.auth.verify import Rejection, policy_rejection, unauthenticated

SESSION_METHOD = "/moe.auth.v1.Sessions/Open"
SEQ_KEY = "x-moe-session-seq"
MAC_KEY = "x-moe-session-mac-bin"
PUBLIC_KEY_BYTES = 32
MAC_BYTES = 32
_DOMAIN = b"moe-subnet/frames-session/v1"
_SEQ = re.compile(r"[1-9][0-9]{0,18}")


def _new_x25519_key():
    return ECC.generate(curve="curve25519")


def _public_bytes(private) -> bytes:
    return private.public_key().export_key(format="raw")


def _shared_secret(private, peer_public: bytes) -> bytes:
    """X25519; ValueError for a key that is not a valid curve point (low-order points included)."""
    peer = import_x25519_public_key(bytes(peer_public))
    return key_agreement(static_priv=private, static_pub=peer, kdf=lambda z: z)


def _session_key(shared: bytes, caller_public: bytes, receiver_public: bytes, caller: str, receiver: str) -> bytes:
    transcript = b"\n".join((_DOMAIN, bytes(caller_public), bytes(receiver_public), caller.encode(), receiver.encode()))
    return hmac.digest(shared, transcript, "sha256")


def call_mac(key: bytes, method: str, seq: int, body_sha256: bytes) -> bytes:
    return hmac.digest(key, b"%s\n%s\n%d\n%s" % (_DOMAIN, method.encode(), seq, body_sha256), "sha256")


# ---- the caller's side ---------------------------------------------------------------------------

class ClientSession:
    """The caller's half of one connection's session. Not thread-safe: a connection carries one call
    at a time, and the caller holding it is the only one who seals."""

    def __init__(self, key: bytes, caller: str, receiver: str):
        self.key, self.caller, self.receiver = key, caller, receiver
        self.seq = 0

    def seal(self, method: str, body: bytes) -> tuple[tuple[str, str | bytes], ...]:
        """The metadata entries that make `body`, sent to `method`, this session's next call."""
        self.seq += 1
        mac = call_mac(self.key, method, self.seq, hashlib.sha256(body).digest())
        return (SEQ_KEY, str(self.seq)), (MAC_KEY, mac)


class SessionOffer:
    """The caller's side of an Open: `body` to send (signed, to SESSION_METHOD), then `accept(answer)`."""

    def __init__(self, caller: str, receiver: str):
        self.caller, self.receiver = caller, receiver
        self._private = _new_x25519_key()
        self.body = _public_bytes(self._private)

    def accept(self, answer: bytes) -> ClientSession:
        """The session, from the receiver's answer; ValueError when the answer is not a public key."""
        if len(answer) != PUBLIC_KEY_BYTES:
            raise ValueError(f"session answer of {len(answer)} bytes; a {PUBLIC_KEY_BYTES}-byte X25519 key expected")
        shared = _shared_secret(self._private, answer)
        self._private = None   # forward secrecy: the exchange's secret is not kept
        return ClientSession(_session_key(shared, self.body, answer, self.caller, self.receiver),
                             self.caller, self.receiver)


class FramesAuth:
    """How one caller authenticates its moe-frames calls to one receiver (the hotkey its signer names):
    a session per connection where the receiver offers them, else a signature per call."""

    def __init__(self, signer: SigningChannel):
        self._signer = signer

    def offer(self) -> tuple[SessionOffer, tuple] | None:
        """(offer, the signed metadata of an Open sending `offer.body`); None without a receiver hotkey."""
        receiver = self._signer.receiver()
        if self._signer.identity is None or not receiver:
            return None
        offer = SessionOffer(self._signer.identity.hotkey, receiver)
        return offer, sign_metadata(self._signer.identity, SESSION_METHOD, offer.body, receiver)

    def metadata(self, session: ClientSession | None, method: str, body: bytes, metadata: Iterable) -> tuple:
        """`metadata` plus what authenticates this call: the session's MAC while the session is with the
        receiver the signer names now, else a signature."""
        if session is not None and session.receiver == self._signer.receiver():
            return tuple(metadata) + session.seal(method, body)
        return self._signer.sign(method, body, None, metadata)[1]


# ---- the receiver's side -------------------------------------------------------------------------

class ServerSession:
    """The receiver's half: whose session it is, its key, and the last seq it accepted."""

    def __init__(self, key: bytes, caller: str):
        self.key, self.caller = key, caller
        self.seq = 0

    def check(self, method: str, body_sha256: bytes, metadata: Iterable[tuple[str, str | bytes]],
              policy: Policy) -> Rejection | None:
        """None when the call is this session's next one, unchanged, and the caller still allowed."""
        seq, mac = _entries(metadata)
        if not isinstance(seq, str) or not _SEQ.fullmatch(seq) or not isinstance(mac, bytes) or len(mac) != MAC_BYTES:
            return unauthenticated("malformed_metadata", f"session calls need {SEQ_KEY} (a positive integer) and "
                                                         f"{MAC_KEY} ({MAC_BYTES} bytes)")
        if int(seq) != self.seq + 1:
            return unauthenticated("session_seq", f"session call {seq} out of order: call {self.seq + 1} expected "
                                                  f"on this connection (a replayed or dropped call)")
        if not hmac.compare_digest(mac, call_mac(self.key, method, int(seq), body_sha256)):
            return unauthenticated("bad_session_mac", f"bad session MAC: not this connection's session's MAC of "
                                                      f"this request to {method} (changed on the way?)")
        self.seq += 1   # an authentic call uses its seq up, allowed or not: the caller counts it too
        return policy_rejection(policy, self.caller)


def has_session_entries(metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    return any(key == MAC_KEY for key, _ in metadata)


def open_session(body: bytes, metadata: Iterable[tuple[str, str | bytes]],
                 receiver: str) -> tuple[ServerSession, bytes]:
    """The receiver's answer to an Open whose signature was verified (the caller is its HOTKEY_KEY):
    (the session, the body to answer). ValueError when the body is not a valid public key."""
    if len(body) != PUBLIC_KEY_BYTES:
        raise ValueError(f"session request body of {len(body)} bytes; a {PUBLIC_KEY_BYTES}-byte X25519 public key "
                         f"expected")
    caller = next((value for key, value in metadata if key == HOTKEY_KEY), None)
    if not isinstance(caller, str):   # the Open's signature check makes this unreachable; fail closed anyway
        raise ValueError(f"session request without {HOTKEY_KEY}")
    private = _new_x25519_key()
    answer = _public_bytes(private)
    shared = _shared_secret(private, body)
    return ServerSession(_session_key(shared, body, answer, caller, receiver), caller), answer


def _entries(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str | bytes | None, str | bytes | None]:
    """(seq, mac); None for one that is missing or given twice (malformed either way)."""
    found: dict[str, list[str | bytes]] = {SEQ_KEY: [], MAC_KEY: []}
    for key, value in metadata:
        if key in found:
            found[key].append(value)
    seq, mac = found[SEQ_KEY], found[MAC_KEY]
    return (seq[0] if len(seq) == 1 else None), (mac[0] if len(mac) == 1 else None)
