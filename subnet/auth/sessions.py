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

3. Answers (when the Open asked for it, ANSWERS_FLAG after the caller's key; this library always
   does): the receiver signs its Open answer with its hotkey (`_open_answer_payload`: both X25519
   keys and both hotkeys), so the caller knows the session is with the hotkey the registry lists
   and not with whoever answered on the path; and each answer to a session call carries
   ANSWER_MAC_BYTES of HMAC-SHA256(key, answer domain, method, seq, status, sha256 of the details,
   sha256 of the body) (`answer_mac`; protocol.FLAG_ANSWER_MAC says it is there). The caller takes
   no OK answer without its matching MAC.

What this keeps: a call is bound to its body and method and to this receiver (the key is this
pair's); a recorded call cannot be replayed (seq), nor a recorded connection (the Open's nonce and
timestamp, and a fresh receiver key per connection); someone on the path who can read and inject
TCP can forge neither a call nor an answer (the key never crossed the wire, and the receiver's
half of the exchange is signed), nor move an answer to another call (seq and method). What it does
not add: nothing is encrypted, as over gRPC without TLS; an error answer without a MAC is still
taken as that error (someone on the path can always break a call); and someone on the path who
refuses the Open makes the caller sign each call instead, whose answers are not authenticated
(see README, "Known limits"). A tensor in shared memory (subnet.shm) is outside the body the MAC
covers: shared memory is a same-host channel, outside what crosses the network.

A caller without a session on a connection (the receiver does not offer sessions: auth off, or
an older service answers UNIMPLEMENTED) signs every call as before. gRPC calls are always signed
per call: a gRPC channel is not one connection one caller owns.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable

from Crypto.Protocol.DH import import_x25519_public_key, key_agreement
from Crypto.PublicKey import ECC

from subnet.auth.client import SigningChannel
from subnet.auth.payload import HOTKEY_KEY, SIGNATURE_BYTES, sign_metadata
from subnet.auth.policy import Policy
from subnet.auth.verify import Rejection, policy_rejection, unauthenticated
from subnet.identity import Identity, verify_signature

SESSION_METHOD = "/moe.auth.v1.Sessions/Open"
SEQ_KEY = "x-moe-session-seq"
MAC_KEY = "x-moe-session-mac-bin"
PUBLIC_KEY_BYTES = 32
MAC_BYTES = 32
ANSWER_MAC_BYTES = 32
# Appended to the caller's key in an Open's body: "sign the Open answer and MAC every answer". A
# receiver from before it refuses the longer body, and the caller then signs each call.
ANSWERS_FLAG = b"\x01"
_DOMAIN = b"moe-subnet/frames-session/v1"
_ANSWER_DOMAIN = b"moe-subnet/frames-session/v1/answer"
_OPEN_ANSWER_DOMAIN = b"moe-subnet/frames-session/v1/open-answer"
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


def answer_mac(key: bytes, method: str, seq: int, code: int, details: bytes, body: bytes) -> bytes:
    """The MAC of the answer (status `code`, `details`, `body`) to session call `seq` to `method`."""
    return hmac.digest(key, b"%s\n%s\n%d\n%d\n%s\n%s" % (
        _ANSWER_DOMAIN, method.encode(), seq, code, hashlib.sha256(details).digest(),
        hashlib.sha256(body).digest()), "sha256")


def _open_answer_payload(caller_public: bytes, receiver_public: bytes, caller: str, receiver: str) -> bytes:
    """What the receiver signs in its Open answer: its half of the exchange, bound to the caller's."""
    return b"\n".join((_OPEN_ANSWER_DOMAIN, bytes(caller_public), bytes(receiver_public), caller.encode(),
                       receiver.encode()))


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

    def answer_error(self, method: str, seq: int, code: int, details: bytes, body: bytes,
                     mac: bytes | None) -> str | None:
        """None when `mac` is the receiver's MAC of this answer to call `seq`; else why it is not taken. An
        error answer without a MAC is taken as the error it says (the call failed either way)."""
        if mac is None:
            return None if code != 0 else "the answer carries no session MAC (not from the expert's session?)"
        if not hmac.compare_digest(mac, answer_mac(self.key, method, seq, code, details, body)):
            return "the answer's session MAC does not match (changed on the way, or not from the expert)"
        return None


class SessionOffer:
    """The caller's side of an Open: `body` to send (signed, to SESSION_METHOD), then `accept(answer)`."""

    def __init__(self, caller: str, receiver: str):
        self.caller, self.receiver = caller, receiver
        self._private = _new_x25519_key()
        self.public = _public_bytes(self._private)
        self.body = self.public + ANSWERS_FLAG

    def accept(self, answer: bytes) -> ClientSession:
        """The session, from the receiver's answer: its X25519 key and its hotkey's signature of it; ValueError
        when the answer is not that, or not signed by the receiver's hotkey."""
        size = PUBLIC_KEY_BYTES + SIGNATURE_BYTES
        if len(answer) != size:
            raise ValueError(f"session answer of {len(answer)} bytes; {size} expected (an X25519 key and the "
                             f"receiver's signature of it)")
        public, signature = bytes(answer[:PUBLIC_KEY_BYTES]), bytes(answer[PUBLIC_KEY_BYTES:])
        if not verify_signature(self.receiver, _open_answer_payload(self.public, public, self.caller, self.receiver),
                                signature):
            raise ValueError(f"session answer not signed by the receiver's hotkey {self.receiver} (someone else "
                             f"answered the Open?)")
        shared = _shared_secret(self._private, public)
        self._private = None   # forward secrecy: the exchange's secret is not kept
        return ClientSession(_session_key(shared, self.public, public, self.caller, self.receiver),
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

    def metadata(self, session: ClientSession | None, method: str, body: bytes,
                 metadata: Iterable) -> tuple[tuple, AnswerTest | None]:
        """`metadata` plus what authenticates this call: the session's MAC while the session is with the
        receiver the signer names now, else a signature; and the test its answer must pass (`AnswerTest`;
        None for a call sent unsigned, for want of a receiver hotkey)."""
        if session is not None and session.receiver == self._signer.receiver():
            sealed = tuple(metadata) + session.seal(method, body)
            seq = session.seq

            def session_test(code: int, details: bytes, body_: bytes, tag: bytes | None) -> str | None:
                mac = tag if tag is not None and len(tag) == ANSWER_MAC_BYTES else None
                if tag is not None and mac is None and code == 0:
                    return "the answer to a session call carries a signature, not the session's MAC"
                return session.answer_error(method, seq, code, details, body_, mac)
            return sealed, session_test
        _, signed, check = self._signer.sign_call(method, body, None, metadata)
        if check is None:
            return signed, None

        def signature_test(code: int, details: bytes, body_: bytes, tag: bytes | None) -> str | None:
            if code != 0:   # an error is taken as it comes
                return None
            return check.problem(body_, tag if tag is not None and len(tag) == SIGNATURE_BYTES else None)
        return signed, signature_test


# (status code value, details, body, answer tag or None) -> None, or why the answer is not taken
AnswerTest = Callable[[int, bytes, bytes, "bytes | None"], "str | None"]


# ---- the receiver's side -------------------------------------------------------------------------

class ServerSession:
    """The receiver's half: whose session it is, its key, and the last seq it accepted."""

    def __init__(self, key: bytes, caller: str, answer_macs: bool = False):
        self.key, self.caller, self.answer_macs = key, caller, answer_macs
        self.seq = 0
        self._answering: int | None = None   # the seq of the call being answered, once its check passed

    def seal_answer(self, method: str, code: int, details: bytes, body: bytes) -> bytes | None:
        """The MAC for the answer to the call just checked (None: no MAC asked, or no call checked since the
        last answer, e.g. a call refused before or by its session check, which the caller does not count)."""
        seq, self._answering = self._answering, None
        if not self.answer_macs or seq is None:
            return None
        return answer_mac(self.key, method, seq, code, details, body)

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
        self._answering = self.seq
        return policy_rejection(policy, self.caller)


def has_session_entries(metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    return any(key == MAC_KEY for key, _ in metadata)


def open_session(body: bytes, metadata: Iterable[tuple[str, str | bytes]],
                 receiver: Identity) -> tuple[ServerSession, bytes]:
    """The receiver's answer to an Open whose signature was verified (the caller is its HOTKEY_KEY):
    (the session, the body to answer). The body is the caller's X25519 key, with ANSWERS_FLAG after it
    when the caller asks for a signed answer and answer MACs (a caller from before it sends the key
    alone and gets the key alone). ValueError when the body is neither."""
    answers = len(body) == PUBLIC_KEY_BYTES + len(ANSWERS_FLAG) and bytes(body[PUBLIC_KEY_BYTES:]) == ANSWERS_FLAG
    if len(body) != PUBLIC_KEY_BYTES and not answers:
        raise ValueError(f"session request body of {len(body)} bytes; a {PUBLIC_KEY_BYTES}-byte X25519 public key "
                         f"expected, optionally followed by {ANSWERS_FLAG!r}")
    caller = next((value for key, value in metadata if key == HOTKEY_KEY), None)
    if not isinstance(caller, str):   # the Open's signature check makes this unreachable; fail closed anyway
        raise ValueError(f"session request without {HOTKEY_KEY}")
    caller_public = bytes(body[:PUBLIC_KEY_BYTES])
    private = _new_x25519_key()
    public = _public_bytes(private)
    shared = _shared_secret(private, caller_public)
    session = ServerSession(_session_key(shared, caller_public, public, caller, receiver.hotkey), caller,
                            answer_macs=answers)
    if not answers:
        return session, public
    return session, public + receiver.sign(_open_answer_payload(caller_public, public, caller, receiver.hotkey))


def _entries(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str | bytes | None, str | bytes | None]:
    """(seq, mac); None for one that is missing or given twice (malformed either way)."""
    found: dict[str, list[str | bytes]] = {SEQ_KEY: [], MAC_KEY: []}
    for key, value in metadata:
        if key in found:
            found[key].append(value)
    seq, mac = found[SEQ_KEY], found[MAC_KEY]
    return (seq[0] if len(seq) == 1 else None), (mac[0] if len(mac) == 1 else None)
