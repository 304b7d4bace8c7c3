"""The router's gRPC and HTTP APIs at their limits, on a running router (one in-process model, a real
byte-level BPE tokenizer, a batch of one stream and a queue of one): an overloaded or stopping router, a
request that trickles in, numbers too large for a float, the standard library's own refusals and a
prompt too long to be worth tokenizing are each answered with a clear status and a JSON or gRPC
error, without a traceback in the log."""

from __future__ import annotations

import json
import socket

import grpc
import pytest
import torch

from moe import MoELM, preset
from moe.data.tokenizer import BPETokenizer
from services.router.http_api import HttpApi
from services.router.metrics import RouterMetrics
from services.router.replicas import ReplicaSet
from services.router.server import RouterServer
from services.router.servicer import RouterServicer
from subnet.wire.v1 import router_pb2, router_pb2_grpc
from tests.integration.test_router_hostile_http import connection, error_of, request

pytestmark = pytest.mark.integration
BLOCK, TIMEOUT_S = 32, 2.0


class _NoRegistry:
    def all_replicas(self):
        return {}


def _router(max_queued: int = 1):
    tokenizer = BPETokenizer.train(["hello world the quick brown fox"] * 50, vocab_size=300)
    torch.manual_seed(0)
    model = MoELM(preset("tiny", vocab_size=tokenizer.vocab_size, block_size=BLOCK))
    servicer = RouterServicer(model, tokenizer, ReplicaSet(_NoRegistry()), RouterMetrics(), max_new_tokens=64,
                              max_batch=1, max_queued=max_queued)
    server = RouterServer(servicer, "127.0.0.1", 0, max_message_mb=4).start()
    api = HttpApi(servicer.engine, "127.0.0.1", 0, timeout_s=TIMEOUT_S).start()
    return server, api, servicer


@pytest.fixture(scope="module")
def router():
    server, api, servicer = _router()
    yield server, api, servicer.engine
    api.stop()
    server.stop(grace_s=0)


@pytest.fixture
def quiet(caplog, capsys):
    """After the test: nothing logged at WARNING or above, and no traceback on stderr."""
    caplog.set_level("DEBUG", logger="services.router")
    yield
    loud = [r for r in caplog.records if r.levelno >= 30 or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    assert "Traceback" not in capsys.readouterr().err


def _raw(api: HttpApi, data: bytes) -> tuple[int, dict]:
    """Send `data` as it is on a fresh connection; the answer's status and JSON body."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.usefixtures("quiet")
def test_a_full_queue_gets_503_not_a_server_error(router):
    server, api, engine = router
    waiting = [connection(api), connection(api)]   # the one slot and the queue of one
    responses = []
    try:
        with engine.loop.model_lock:   # the loop cannot admit them meanwhile: both wait, and the queue is full
            for conn in waiting:
                conn.request("POST", "/v1/completions", body=json.dumps(
                    {"prompt": "hello", "max_tokens": 2, "stream": True}).encode())
                responses.append(conn.getresponse())
                assert responses[-1].status == 200
            status, _, raw = request(api, "POST", "/v1/completions", {"prompt": "hello", "max_tokens": 2})
            with grpc.insecure_channel(server.endpoint) as ch, pytest.raises(grpc.RpcError) as info:
                list(router_pb2_grpc.RouterStub(ch).Generate(
                    router_pb2.GenerateRequest(prompt="hello", max_new_tokens=1), timeout=30))
        for response in responses:   # and both are served once the model is free
            assert response.read().decode().endswith("data: [DONE]\n\n")
    finally:
        for conn in waiting:
            conn.close()
    assert status == 503
    error = error_of(raw)
    assert error["type"] == "server_error" and "try again" in error["message"]
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.usefixtures("quiet")
def test_an_integer_too_large_for_a_float_is_a_400_naming_the_field(router):
    _, api, _ = router
    body = b'{"prompt": "hello", "max_tokens": 1, "temperature": 1' + b"0" * 400 + b"}"
    status, _, raw = request(api, "POST", "/v1/completions", body)
    assert status == 400
    assert error_of(raw)["message"] == "temperature must be a finite number, got an integer of 401 digits"


@pytest.mark.usefixtures("quiet")
def test_the_documented_minimum_temperature_passes_over_grpc_as_a_float32(router):
    server, _, _ = router
    with grpc.insecure_channel(server.endpoint) as ch:
        tokens = list(router_pb2_grpc.RouterStub(ch).Generate(
            router_pb2.GenerateRequest(prompt="hello", max_new_tokens=2, temperature=0.01, seed=1), timeout=30))
    assert len(tokens) == 2


@pytest.mark.usefixtures("quiet")
def test_a_prompt_longer_than_any_context_is_refused_before_it_is_tokenized(router, monkeypatch):
    server, _, engine = router
    per_token = engine.tokenizer.max_token_chars
    encoded = []
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text: encoded.append(text) or [])
    with grpc.insecure_channel(server.endpoint) as ch, pytest.raises(grpc.RpcError) as info:
        list(router_pb2_grpc.RouterStub(ch).Generate(
            router_pb2.GenerateRequest(prompt="x" * (BLOCK * per_token + 1), max_new_tokens=1), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (f"prompt has {BLOCK * per_token + 1} characters, more than the model's context "
                                    f"of {BLOCK} tokens can hold (a token is at most {per_token} characters): "
                                    f"shorten it")
    assert encoded == []


@pytest.mark.parametrize("text", ["hello world the quick brown fox " * 20, "<|endoftext|>" * 20,
                                  "héllo wörld ✓ 🦊 " * 20, "x" * 500])
def test_the_bound_refuses_nothing_that_would_fit(text):
    """A text of n characters is at least n / max_token_chars tokens, for the densest texts there are:
    the training text itself, the special token written out (it counts, 13 characters, one token), and
    characters of several bytes."""
    tokenizer = BPETokenizer.train(["hello world the quick brown fox"] * 50, vocab_size=300)
    assert len(tokenizer.encode(text)) >= len(text) / tokenizer.max_token_chars


def test_a_tokenizer_with_a_normalizer_gives_no_bound(tmp_path):
    """A normalizer can shorten the text before it is split (NFKC composes "e" and U+0301 into "é"): no
    bound can then be read off the vocabulary, and the length check is skipped."""
    from tokenizers import normalizers

    tokenizer = BPETokenizer.train(["hello world"] * 10, vocab_size=280)
    tokenizer.hf_tokenizer.normalizer = normalizers.NFKC()
    assert BPETokenizer.from_file(tokenizer.save(tmp_path / "tokenizer.json")).max_token_chars is None


def _trickle(api: HttpApi, start: bytes, filler: bytes) -> bytes:
    """Send `start`, then one byte of `filler` every 0.4 s (each within the socket timeout, so only the
    request's deadline can stop it) until the server answers and closes; what it answered."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as s:
        s.sendall(start)
        s.settimeout(0.4)
        answer = b""
        for i in range(150):   # 60 s at most
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                try:
                    s.sendall(filler[i % len(filler):][:1])
                except OSError:   # the server shut its side
                    pass
                continue
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.usefixtures("quiet")
def test_headers_or_a_body_that_trickle_in_get_408_and_free_the_connection(router):
    _, api, _ = router
    before = api.deadlines.expired
    for start, filler in ((b"POST /v1/completions HTTP/1.1\r\nX-Slow: ", b"abcdefgh"),        # headers never end
                          (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 1000\r\n\r\n", b" "),  # nor the body
                          (b"GET /hea", b"d")):   # nor the request line (cut, it reads as HTTP/0.9)
        answer = _trickle(api, start, filler)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split()[1:2] == [b"408"], answer
        error = error_of(body)
        assert "not received whole within 2 s" in error["message"] and error["type"] == "invalid_request_error"
    assert api.deadlines.expired == before + 3
    status, _, _ = request(api, "GET", "/health")   # the server goes on
    assert status == 200


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("data, status", [
    (b"FOO /health HTTP/1.1\r\n\r\n", 501),                              # a method nobody serves
    (b"GARBAGE\r\n\r\n", 400),                                            # not a request line
    (b"GET /health HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),  # a header line over 64 KiB
    (b"GET /health HTTP/2.0\r\n\r\n", 505),
])
def test_the_standard_librarys_own_refusals_are_json_too(router, data, status):
    _, api, _ = router
    got, body = _raw(api, data)
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


@pytest.mark.usefixtures("quiet")
def test_a_stopping_router_answers_unavailable_and_503():
    server, api, servicer = _router(max_queued=4)
    try:
        servicer.engine.close()   # the decode loop stops first when the router does
        status, _, raw = request(api, "POST", "/v1/completions", {"prompt": "hello", "max_tokens": 1})
        with grpc.insecure_channel(server.endpoint) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            with pytest.raises(grpc.RpcError) as generate:
                list(stub.Generate(router_pb2.GenerateRequest(prompt="hello", max_new_tokens=1), timeout=30))
            with pytest.raises(grpc.RpcError) as logits:
                stub.Logits(router_pb2.LogitsRequest(tokens=[1, 2]), timeout=30)
    finally:
        api.stop()
        server.stop(grace_s=0)
    assert status == 503 and "shutting down" in error_of(raw)["message"]
    for info in (generate, logits):
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the router is shutting down" in info.value.details()


def test_a_failing_logits_pass_is_internal_and_logged_once_per_interval(router, monkeypatch, caplog, capfd):
    import services.router.servicer as servicer
    from subnet.log_throttle import LogThrottle

    server, _, engine = router
    monkeypatch.setattr(servicer, "_FAILED_PASSES", LogThrottle(10.0))   # whatever earlier tests logged

    def broken(*args, **kwargs):
        raise RuntimeError("injected model failure")

    monkeypatch.setattr(engine.model, "forward", broken)
    caplog.set_level("DEBUG", logger="services.router")
    with grpc.insecure_channel(server.endpoint) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                stub.Logits(router_pb2.LogitsRequest(tokens=[1, 2]), timeout=30)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert info.value.details() == "the model pass failed inside the router; see its log"
    logged = [r for r in caplog.records if r.getMessage().startswith("Logits: the model pass failed")]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "Exception calling application" not in capfd.readouterr().err + caplog.text
