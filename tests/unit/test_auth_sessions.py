"""Sessions on moe-frames connections (subnet.auth.sessions), both halves in one process: the key
exchange agrees, its answer is taken only signed by the receiver's hotkey, a session call is taken
only once, unchanged, in order, from an allowed caller, and an answer only with its own MAC."""

import hashlib

import grpc
import pytest

from subnet.auth.policy import AllowList
from subnet.auth.sessions import (
    ANSWERS_FLAG,
    MAC_KEY,
    PUBLIC_KEY_BYTES,
    SEQ_KEY,
    SessionOffer,
    _open_answer_payload,
    open_session,
)
from subnet.identity import Identity

FORWARD = "/moe.v1.Expert/Forward"


@pytest.fixture(scope="module")
def keys():
    return Identity.generate(), Identity.generate()


def _opened(keys):
    """(caller's session, receiver's session) after one Open."""
    caller, receiver = keys
    offer = SessionOffer(caller.hotkey, receiver.hotkey)
    server, answer = open_session(offer.body, (("x-moe-hotkey", caller.hotkey),), receiver)
    return offer.accept(answer), server


def _check(server, method, body, metadata, allowed):
    return server.check(method, hashlib.sha256(body).digest(), metadata, AllowList(allowed))


def test_both_ends_derive_one_key_and_calls_go_through_in_order(keys):
    client, server = _opened(keys)
    assert client.key == server.key and len(client.key) == 32
    for i in range(1, 4):
        body = bytes([i]) * 100
        metadata = client.seal(FORWARD, body)
        assert dict(metadata)[SEQ_KEY] == str(i)
        assert _check(server, FORWARD, body, metadata, [keys[0].hotkey]) is None
    assert server.seq == 3


def test_every_connection_gets_its_own_key(keys):
    assert _opened(keys)[0].key != _opened(keys)[0].key


def test_a_replayed_reordered_or_changed_call_is_refused_and_changes_nothing(keys):
    client, server = _opened(keys)
    allowed = [keys[0].hotkey]
    first = client.seal(FORWARD, b"one")
    second = client.seal(FORWARD, b"two")
    out_of_order = _check(server, FORWARD, b"two", second, allowed)
    assert (out_of_order.code, out_of_order.reason) == (grpc.StatusCode.UNAUTHENTICATED, "session_seq")
    assert _check(server, FORWARD, b"changed", first, allowed).reason == "bad_session_mac"
    assert _check(server, "/moe.v1.Expert/Backward", b"one", first, allowed).reason == "bad_session_mac"
    assert server.seq == 0   # refusals do not move the session on
    assert _check(server, FORWARD, b"one", first, allowed) is None
    replay = _check(server, FORWARD, b"one", first, allowed)
    assert replay.reason == "session_seq" and "call 2 expected" in replay.message
    assert _check(server, FORWARD, b"two", second, allowed) is None


def test_another_sessions_mac_is_refused(keys):
    client, _ = _opened(keys)
    _, other_server = _opened(keys)
    rejection = _check(other_server, FORWARD, b"x", client.seal(FORWARD, b"x"), [keys[0].hotkey])
    assert rejection.reason == "bad_session_mac"


def test_the_policy_is_asked_on_every_call(keys):
    """A caller dropped from the allowlist (or the metagraph) is refused at its next session call."""
    client, server = _opened(keys)
    assert _check(server, FORWARD, b"a", client.seal(FORWARD, b"a"), [keys[0].hotkey]) is None
    denied = _check(server, FORWARD, b"b", client.seal(FORWARD, b"b"), [])
    assert denied.code is grpc.StatusCode.PERMISSION_DENIED and keys[0].hotkey in denied.message
    # The denied call used its seq up on both sides: allowed again, the next call goes through.
    assert _check(server, FORWARD, b"c", client.seal(FORWARD, b"c"), [keys[0].hotkey]) is None


@pytest.mark.parametrize("metadata", [
    ((SEQ_KEY, "1"),),                                           # no MAC
    ((SEQ_KEY, "0"), (MAC_KEY, bytes(32))),                      # seq starts at 1
    ((SEQ_KEY, "01"), (MAC_KEY, bytes(32))),                     # no leading zeros
    ((SEQ_KEY, "1"), (MAC_KEY, bytes(31))),                      # short MAC
    ((SEQ_KEY, "1"), (MAC_KEY, "not bytes")),
    ((SEQ_KEY, "1"), (SEQ_KEY, "1"), (MAC_KEY, bytes(32))),      # given twice
])
def test_malformed_session_entries_are_named(keys, metadata):
    _, server = _opened(keys)
    rejection = _check(server, FORWARD, b"x", metadata, [keys[0].hotkey])
    assert (rejection.code, rejection.reason) == (grpc.StatusCode.UNAUTHENTICATED, "malformed_metadata")
    assert SEQ_KEY in rejection.message


@pytest.mark.parametrize("public", [b"", bytes(31), bytes(32), b"\x01" + bytes(31)])
def test_a_bad_public_key_is_a_value_error_on_either_side(keys, public):
    """Wrong length, or a low-order point (all zeros, 1), whose shared secret would be known to anyone;
    on the caller's side even when the receiver's hotkey signed it."""
    caller, receiver = keys
    with pytest.raises(ValueError):
        open_session(public, (("x-moe-hotkey", caller.hotkey),), receiver)
    if len(public) == PUBLIC_KEY_BYTES:   # shorter ones would read as a whole key with the flag byte
        with pytest.raises(ValueError):
            open_session(public + ANSWERS_FLAG, (("x-moe-hotkey", caller.hotkey),), receiver)
    offer = SessionOffer(caller.hotkey, receiver.hotkey)
    with pytest.raises(ValueError):
        offer.accept(public + receiver.sign(_open_answer_payload(offer.public, public, caller.hotkey, receiver.hotkey)))


def test_the_open_answer_is_taken_only_signed_by_the_receivers_hotkey(keys):
    """Someone on the path who answers the Open with a key of its own cannot sign for the receiver, nor
    reuse a signed answer to another Open, nor swap the key under a signature."""
    caller, receiver = keys
    metadata = (("x-moe-hotkey", caller.hotkey),)
    offer = SessionOffer(caller.hotkey, receiver.hotkey)
    _, impostor_answer = open_session(offer.body, metadata, Identity.generate())
    with pytest.raises(ValueError, match="not signed by the receiver's hotkey"):
        offer.accept(impostor_answer)
    _, old_answer = open_session(SessionOffer(caller.hotkey, receiver.hotkey).body, metadata, receiver)
    with pytest.raises(ValueError, match="not signed"):
        offer.accept(old_answer)   # signed, but for another caller key
    _, answer = open_session(offer.body, metadata, receiver)
    _, other = open_session(offer.body, metadata, receiver)
    with pytest.raises(ValueError, match="not signed"):
        offer.accept(other[:PUBLIC_KEY_BYTES] + answer[PUBLIC_KEY_BYTES:])
    with pytest.raises(ValueError, match="96 expected"):
        offer.accept(answer[:PUBLIC_KEY_BYTES])   # an unsigned answer (a receiver from before signing)
    assert offer.accept(answer).key is not None


def test_a_caller_from_before_answer_macs_gets_a_plain_key_and_no_macs(keys):
    caller, receiver = keys
    offer = SessionOffer(caller.hotkey, receiver.hotkey)
    server, answer = open_session(offer.public, (("x-moe-hotkey", caller.hotkey),), receiver)
    assert len(answer) == PUBLIC_KEY_BYTES and not server.answer_macs
    client = SessionOffer(caller.hotkey, receiver.hotkey)
    assert _check(server, FORWARD, b"a", offer_session(offer, answer).seal(FORWARD, b"a"), [caller.hotkey]) is None
    assert server.seal_answer(FORWARD, 0, b"", b"y") is None
    assert client.body.endswith(ANSWERS_FLAG)


def offer_session(offer, plain_answer):
    """The caller's session from an unsigned answer, as a caller from before signed answers made it."""
    from subnet.auth.sessions import ClientSession, _session_key, _shared_secret
    return ClientSession(_session_key(_shared_secret(offer._private, plain_answer), offer.public, plain_answer,
                                      offer.caller, offer.receiver), offer.caller, offer.receiver)


def test_an_answer_is_taken_only_with_the_mac_of_its_own_call(keys):
    client, server = _opened(keys)
    allowed = [keys[0].hotkey]
    assert _check(server, FORWARD, b"in", client.seal(FORWARD, b"in"), allowed) is None
    mac = server.seal_answer(FORWARD, 0, b"", b"out")
    assert len(mac) == 32
    assert client.answer_error(FORWARD, 1, 0, b"", b"out", mac) is None
    for method, seq, code, details, body in [(FORWARD, 1, 0, b"", b"changed"), (FORWARD, 2, 0, b"", b"out"),
                                             ("/moe.v1.Expert/Backward", 1, 0, b"", b"out"),
                                             (FORWARD, 1, 5, b"", b"out"), (FORWARD, 1, 0, b"x", b"out")]:
        assert "does not match" in client.answer_error(method, seq, code, details, body, mac)
    assert "no session MAC" in client.answer_error(FORWARD, 1, 0, b"", b"out", None)
    assert client.answer_error(FORWARD, 1, 5, b"not found", b"", None) is None   # an error is an error
    # One MAC per checked call: nothing to seal for a call that was not checked (refused before it).
    assert server.seal_answer(FORWARD, 0, b"", b"out") is None
    refused = _check(server, FORWARD, b"x", client.seal(FORWARD, b"y"), allowed)
    assert refused.reason == "bad_session_mac" and server.seal_answer(FORWARD, 16, b"", b"") is None
