"""The router's HTTP API against a running router (gRPC and HTTP on one in-process model), with a
real HTTP client: OpenAI-shaped completions, streamed and not, equal to gRPC Generate; health and
model info; bad requests answered 400/411/413 with a message, the server serving on; bearer-token
and closed access."""

from __future__ import annotations

import http.client
import json
import socket
import time

import grpc
import pytest
import torch

from moe import MoELM, preset
from moe.experts import expert_uid
from services.router.http_api import HttpAccess, HttpApi
from services.router.metrics import RouterMetrics
from services.router.replicas import ReplicaSet
from services.router.server import RouterServer
from services.router.servicer import RouterServicer
from subnet.wire.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration
BLOCK, LIMIT, MAX_BODY = 16, 8, 4096


class _NoRegistry:
    def all_replicas(self):
        return {}


class _Letters:
    """One token per letter a..z: prompts and answers stay readable in the assertions."""

    def encode(self, text):
        return [ord(c) % 26 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def router():
    torch.manual_seed(0)
    model = MoELM(preset("tiny", vocab_size=64, block_size=BLOCK))
    servicer = RouterServicer(model, _Letters(), ReplicaSet(_NoRegistry()), RouterMetrics(), max_new_tokens=LIMIT)
    server = RouterServer(servicer, "127.0.0.1", 0, max_message_mb=4).start()
    api = HttpApi(servicer.engine, "127.0.0.1", 0, max_body_bytes=MAX_BODY, timeout_s=10).start()
    yield server, api, servicer.engine
    api.stop()
    server.stop(grace_s=0)


def request(api: HttpApi, method: str, path: str, body=None, headers=None):
    """(status, headers, body bytes) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def complete(api: HttpApi, body, headers=None):
    status, _, raw = request(api, "POST", "/v1/completions", body, headers)
    return status, json.loads(raw)


def events(raw: bytes) -> list:
    """The payloads of a server-sent event stream, `[DONE]` kept as the string."""
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def grpc_generate(server, **fields) -> list:
    with grpc.insecure_channel(server.endpoint) as ch:
        return list(router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(**fields), timeout=30))


def test_completions_equal_grpc_generate_streamed_or_not(router):
    server, api, _ = router
    want = "".join(t.text for t in grpc_generate(server, prompt="hello", max_new_tokens=LIMIT, temperature=0.9,
                                                 seed=7))
    status, answer = complete(api, {"prompt": "hello", "max_tokens": LIMIT, "temperature": 0.9, "seed": 7,
                                    "model": "anything", "top_p": 1})
    assert status == 200
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
    assert answer["choices"] == [{"text": want, "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": LIMIT, "total_tokens": 5 + LIMIT}

    status, headers, raw = request(api, "POST", "/v1/completions",
                                   {"prompt": "hello", "max_tokens": LIMIT, "temperature": 0.9, "seed": 7,
                                    "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    chunks = events(raw)
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == want
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert len({c["id"] for c in chunks[:-1]}) == 1


def test_stop_sequences_end_the_text_before_them(router):
    _, api, _ = router
    body = {"prompt": "hello", "max_tokens": LIMIT, "temperature": 0}
    full = complete(api, body)[1]["choices"][0]["text"]
    stop = full[3:5]
    want = full[:full.find(stop)]
    answer = complete(api, {**body, "stop": [stop, "never"]})[1]
    assert answer["choices"][0]["text"] == want and answer["choices"][0]["finish_reason"] == "stop"
    _, _, raw = request(api, "POST", "/v1/completions", {**body, "stop": stop, "stream": True})
    chunks = events(raw)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == want
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1] == "[DONE]"


def test_health_and_model_info(router):
    _, api, _ = router
    status, _, raw = request(api, "GET", "/health")
    assert status == 200 and json.loads(raw) == {"status": "serving"}
    status, _, raw = request(api, "GET", "/model_info")
    info = json.loads(raw)
    assert status == 200
    uids = [expert_uid(layer, i) for layer in range(info["n_layer"]) for i in range(info["n_experts"])]
    assert {k: info[k] for k in ("vocab_size", "block_size", "step", "max_new_tokens")} == \
        {"vocab_size": 64, "block_size": BLOCK, "step": 0, "max_new_tokens": LIMIT}
    assert info["n_experts"] > 0 and info["live_replicas"] == {uid: 0 for uid in uids if uid in info["expert_uids"]}


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({"max_tokens": 2}, "prompt must be one string"),
    ({"prompt": ["a", "b"]}, "prompt must be one string"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "x" * (BLOCK + 1)}, f"the model's context is {BLOCK}"),
    ({"prompt": "hi", "max_tokens": LIMIT + 1}, f"max_tokens must be in 1..{LIMIT}"),
    ({"prompt": "hi", "max_tokens": 0}, f"max_tokens must be in 1..{LIMIT}"),
    ({"prompt": "hi", "max_tokens": "8"}, "max_tokens must be an integer"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature must be 0 (greedy) or a finite number >= 0.01, got -0.5"),
    ({"prompt": "hi", "temperature": 1e-46}, "temperature must be 0 (greedy) or a finite number >= 0.01, got 1e-46"),
    (b'{"prompt": "hi \\ud800"}', "prompt is not valid Unicode: a lone surrogate '\\ud800' at character 3"),
    (b"[" * 3000, "the body nests arrays or objects too deeply to parse"),
    ({"prompt": "hi", "temperature": True}, "temperature must be a number"),
    ({"prompt": "hi", "top_p": 0.5}, "top_p=0.5 is not supported"),
    ({"prompt": "hi", "n": 2}, "n=2 is not supported"),
    ({"prompt": "hi", "stop": ["a"] * 5}, "stop must be"),
    ({"prompt": "hi", "stream": "yes"}, "stream must be true or false"),
    ({"prompt": "hi", "frobnicate": 1}, "unknown field(s) frobnicate"),
])
def test_bad_requests_get_400_with_a_message(router, body, fragment):
    _, api, _ = router
    status, answer = complete(api, body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and fragment in answer["error"]["message"]


def test_limits_and_routes_and_the_server_serves_on(router):
    server, api, _ = router
    status, answer = complete(api, b" " * (MAX_BODY + 1))
    assert status == 413 and f"limit is {MAX_BODY}" in answer["error"]["message"]
    # A client that asks first (Expect: 100-continue) is refused before it sends the body.
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n")
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413")
    status, _, _ = request(api, "POST", "/v1/completions", None, {"Transfer-Encoding": "chunked"})
    assert status == 411
    status, headers, _ = request(api, "GET", "/v1/completions")
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, raw = request(api, "PUT", "/v1/completions", b"{}")
    assert status == 405 and headers["Allow"] == "POST" and json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert request(api, "GET", "/nowhere")[0] == 404
    # gRPC refuses the same request with the same check's message.
    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(server, prompt="hi", max_new_tokens=LIMIT + 1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"must be in 1..{LIMIT} (ROUTER_MAX_NEW_TOKENS)" in info.value.details()
    status, answer = complete(api, {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and answer["usage"]["completion_tokens"] == 2


def test_bearer_token_and_closed_access(router):
    _, _, engine = router
    rejections = engine.metrics.auth_rejections
    with_token = HttpApi(engine, "127.0.0.1", 0, access=HttpAccess(token="s3cret")).start()
    closed = HttpApi(engine, "127.0.0.1", 0, access=HttpAccess(open=False)).start()
    try:
        body = {"prompt": "hi", "max_tokens": 1}
        status, headers, raw = request(with_token, "POST", "/v1/completions", body)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(raw)["error"]["type"] == "authentication_error"
        assert complete(with_token, body, {"Authorization": "Bearer guess"})[0] == 401
        assert complete(with_token, body, {"Authorization": "Bearer s3cret"})[0] == 200
        status, answer = complete(closed, body)
        assert status == 403 and "ROUTER_HTTP_TOKEN" in answer["error"]["message"]
        assert request(closed, "GET", "/health")[0] == 200 and request(closed, "GET", "/model_info")[0] == 200
    finally:
        with_token.stop()
        closed.stop()
    counted = {s.labels["reason"]: s.value for m in rejections.collect() for s in m.samples
               if s.name.endswith("_total")}
    assert counted == {"http_no_token": 1.0, "http_bad_token": 1.0, "http_closed": 1.0}



def test_connections_beyond_the_limit_get_503_and_a_silent_one_frees_its_slot(router):
    _, _, engine = router
    api = HttpApi(engine, "127.0.0.1", 0, max_connections=1, timeout_s=1.0).start()
    try:
        with socket.create_connection(("127.0.0.1", api.port), timeout=10):   # connects, says nothing
            time.sleep(0.2)
            status, _, raw = request(api, "GET", "/health")
            assert status == 503 and "too many connections" in json.loads(raw)["error"]["message"]
        deadline = time.monotonic() + 5   # the silent connection's thread ends: its slot is free again
        while request(api, "GET", "/health")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        api.stop()
