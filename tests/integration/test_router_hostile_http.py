"""The router's HTTP API against hostile requests, on a running router (gRPC and HTTP on one
in-process model, a real byte-level BPE tokenizer): each is refused with a JSON error that says
what to send instead, logs no traceback, and leaves the other requests alone."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time

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

pytestmark = pytest.mark.integration
BLOCK, LIMIT, MAX_BODY = 32, 5000, 70_000


class _NoRegistry:
    def all_replicas(self):
        return {}


@pytest.fixture(scope="module")
def router():
    tokenizer = BPETokenizer.train(["hello world the quick brown fox"] * 50, vocab_size=300)
    torch.manual_seed(0)
    model = MoELM(preset("tiny", vocab_size=tokenizer.vocab_size, block_size=BLOCK))
    servicer = RouterServicer(model, tokenizer, ReplicaSet(_NoRegistry()), RouterMetrics(), max_new_tokens=LIMIT)
    server = RouterServer(servicer, "127.0.0.1", 0, max_message_mb=4).start()
    api = HttpApi(servicer.engine, "127.0.0.1", 0, max_body_bytes=MAX_BODY, timeout_s=10).start()
    yield server, api, servicer.engine
    api.stop()
    server.stop(grace_s=0)


def connection(api: HttpApi) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)


def request(api: HttpApi, method: str, path: str, body=None):
    """(status, headers, body bytes) of one request on a fresh connection."""
    conn = connection(api)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def error_of(raw: bytes) -> dict:
    """The `error` object of a JSON error answer, checked for the shape every error has."""
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


@pytest.fixture
def quiet(caplog, capsys):
    """After the test: nothing logged at WARNING or above, and no traceback on stderr (socketserver
    prints one there for an exception a handler lets out)."""
    caplog.set_level("DEBUG", logger="services.router")
    yield
    loud = [r for r in caplog.records if r.levelno >= 30 or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.usefixtures("quiet")
def test_a_body_nested_too_deeply_gets_400(router):
    _, api, _ = router
    status, _, raw = request(api, "POST", "/v1/completions", b"[" * 60000)
    assert status == 400
    error = error_of(raw)
    assert error["type"] == "invalid_request_error" and "too deeply" in error["message"]


@pytest.mark.usefixtures("quiet")
def test_a_prompt_with_a_lone_surrogate_gets_400_naming_the_field(router):
    _, api, _ = router
    status, _, raw = request(api, "POST", "/v1/completions", b'{"prompt": "hi \\ud800", "max_tokens": 1}')
    assert status == 400
    message = error_of(raw)["message"]
    assert message.startswith("prompt is not valid Unicode") and "\\ud800" in message and "UTF-8" in message
    status, _, _ = request(api, "POST", "/v1/completions", {"prompt": "hi \u00e9", "max_tokens": 1})
    assert status == 200


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("temperature", [1e-46, 1e-320, 0.001])
def test_a_temperature_too_low_to_sample_is_refused_and_a_running_stream_goes_on(router, temperature):
    server, api, engine = router
    innocent, hostile = connection(api), connection(api)
    try:
        # Both streamed: the headers come back once a stream is queued. The loop is held meanwhile,
        # so a hostile stream that got queued (as it did before the fix) shares the innocent's steps.
        with engine.loop.model_lock:
            innocent.request("POST", "/v1/completions", body=json.dumps(
                {"prompt": "hello", "max_tokens": 6, "temperature": 0.8, "seed": 3, "stream": True}).encode())
            response = innocent.getresponse()
            assert response.status == 200
            hostile.request("POST", "/v1/completions", body=json.dumps(
                {"prompt": "hello", "max_tokens": 1, "temperature": temperature, "stream": True}).encode())
            refusal = hostile.getresponse()
        assert refusal.status == 400
        message = error_of(refusal.read())["message"]
        assert message.startswith("temperature must be 0 (greedy) or a finite number >= 0.01, got ")
        chunks = [b[len("data: "):] for b in response.read().decode().split("\n\n") if b]
    finally:
        innocent.close()
        hostile.close()
    assert chunks[-1] == "[DONE]" and len(chunks) >= 2
    assert json.loads(chunks[-2])["choices"][0]["finish_reason"] == "length"
    # gRPC's temperature is a float32 (1e-46 arrives as 0, greedy): a low one is refused with the same check.
    with grpc.insecure_channel(server.endpoint) as ch, pytest.raises(grpc.RpcError) as info:
        list(router_pb2_grpc.RouterStub(ch).Generate(
            router_pb2.GenerateRequest(prompt="hello", max_new_tokens=1, temperature=0.001), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature must be 0 (greedy) or a finite number >= 0.01, got 0.001" in info.value.details()


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_get_405_with_allow_and_a_json_error(router, method):
    _, api, _ = router
    for path, allowed in (("/v1/completions", "POST"), ("/health", "GET"), ("/model_info", "GET")):
        status, headers, raw = request(api, method, path, {"prompt": "hi"})
        assert status == 405 and headers["Allow"] == allowed and headers["Content-Type"] == "application/json"
        error = error_of(raw)
        assert error["type"] == "invalid_request_error"
        assert error["message"] == f"{method} is not allowed on {path}: use {allowed}"
    status, _, raw = request(api, method, "/nowhere", b"")
    assert status == 404 and "try POST /v1/completions" in error_of(raw)["message"]
    assert request(api, "GET", "/health")[0] == 200


def test_head_answers_gets_status_and_headers_without_a_body(router):
    _, api, _ = router
    for path, status in (("/health", 200), ("/model_info", 200), ("/v1/completions", 405), ("/nowhere", 404)):
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0].split(" ")[1] == str(status), (path, lines[0])
        headers = dict(line.split(": ", 1) for line in lines[1:])
        _, get_headers, get_body = request(api, "GET", path)
        assert rest == b"", f"HEAD {path} sent a body"
        assert headers["Content-Type"] == "application/json"
        if path != "/model_info":   # its body may change between the two requests; the others do not
            assert int(headers["Content-Length"]) == len(get_body)


@pytest.mark.usefixtures("quiet")
def test_a_client_that_goes_away_stops_its_generation_and_logs_no_traceback(router):
    _, api, engine = router

    def passes() -> float:
        return sum(s.value for m in engine.metrics.decode_batch.collect() for s in m.samples
                   if s.name.endswith("_count"))
    before = passes()
    body = json.dumps({"prompt": "hello", "max_tokens": LIMIT, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 30
    while engine.loop.active == 0:   # its stream runs: the answer would come after LIMIT tokens
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()   # a reset, as a killed client or a proxy's timeout gives
    while engine.loop.active:
        assert time.monotonic() < deadline + 120   # a bound against hanging, not a speed check
        time.sleep(0.01)
    assert passes() - before < LIMIT   # stopped early: the loop did not compute the whole answer for nobody
    status, _, raw = request(api, "POST", "/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2


def test_a_grpc_stream_whose_sampling_fails_gets_internal_and_no_traceback(router, monkeypatch, caplog, capfd):
    """No request can make sampling fail any more (the temperature check), but a stream that fails
    for another reason is answered INTERNAL, without gRPC's own traceback, and the next one is served.
    The failure is injected: sampling raises for one seed only."""
    import services.router.decode_loop as decode_loop

    server, _, _ = router
    real = decode_loop.sample_next

    def failing_for_seed_13(logits, temperature, top_k, generator=None, **kw):
        if generator is not None and generator.initial_seed() == 13:
            raise RuntimeError("injected sampling failure")
        return real(logits, temperature, top_k, generator=generator, **kw)

    monkeypatch.setattr(decode_loop, "sample_next", failing_for_seed_13)
    with grpc.insecure_channel(server.endpoint) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(router_pb2.GenerateRequest(prompt="hello", max_new_tokens=2, temperature=0.8,
                                                          seed=13), timeout=30))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "sampling the next token failed" in info.value.details()
        served = list(stub.Generate(router_pb2.GenerateRequest(prompt="hello", max_new_tokens=2, temperature=0.8,
                                                               seed=14), timeout=30))
    assert len(served) == 2
    assert "Traceback" not in capfd.readouterr().err + caplog.text
