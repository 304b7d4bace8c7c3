"""subnet.expert_client without sockets: calls run on the pool's call threads, their deadline
counts from the call, failures and cancellation reach the future, close and reopen."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

import subnet.expert_client as ec
from subnet.wire.v1 import expert_pb2


class _Failed(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "gone"


class _Channel:
    """Stands in for grpc.Channel: each method records its calls and answers with `answer(method)`."""

    def __init__(self, answer=lambda method: f"{method} answered"):
        self.answer = answer
        self.calls: list[dict] = []

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        def call(request, timeout=None, metadata=None, **options):
            self.calls.append({"method": method, "request": request, "timeout": timeout, "metadata": metadata,
                               "thread": threading.current_thread().name, "options": options})
            return self.answer(method)
        return call

    unary_stream = stream_unary = stream_stream = unary_unary


class _Clock:
    def __init__(self, now: float):
        self.now = now

    def monotonic(self) -> float:
        return self.now


def _client(channel, calls):
    return ec.ExpertClient("127.0.0.1:1", channel, calls)


def test_a_call_runs_on_a_call_thread_and_its_future_holds_the_answer():
    channel = _Channel()
    with ThreadPoolExecutor(2, thread_name_prefix="expert-call") as calls:
        future = _client(channel, calls).forward("0.3", expert_pb2.ForwardRequest().inputs, call_id="c1", step=4,
                                                 training=False, timeout_s=5.0, metadata=(("k", "v"),))
        assert future.result() == "/moe.v1.Expert/Forward answered"
    (call,) = channel.calls
    assert call["thread"].startswith("expert-call")
    assert call["request"].expert_uid == "0.3" and call["request"].call_id == "c1" and call["request"].step == 4
    assert call["metadata"] == (("k", "v"),) and 0 < call["timeout"] <= 5.0


def test_the_deadline_counts_from_the_call_not_from_when_a_thread_is_free(monkeypatch):
    clock = _Clock(100.0)
    monkeypatch.setattr(ec, "time", clock)
    channel = _Channel()
    release = threading.Event()
    with ThreadPoolExecutor(1) as calls:
        calls.submit(release.wait)   # the only call thread is busy
        client = _client(channel, calls)
        waited = client.grad_norm("0.1", step=1, timeout_s=10.0)
        late = client.grad_norm("0.2", step=1, timeout_s=2.0)
        clock.now = 107.0            # both waited 7 s for the thread
        release.set()
        waited.result()
        late.result()
    assert [c["timeout"] for c in channel.calls] == [3.0, 0.0]   # 0: gRPC answers DEADLINE_EXCEEDED


def test_a_failed_call_raises_its_rpc_error_from_the_future():
    def answer(method):
        raise _Failed()
    with ThreadPoolExecutor(1) as calls:
        future = _client(_Channel(answer), calls).apply_step("0.0", step=0, lr=0.1, grad_scale=1.0,
                                                             weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8,
                                                             timeout_s=5.0)
        error = future.exception()
    assert isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.UNAVAILABLE


def test_a_step_call_sent_again_waits_for_the_channel_only_when_asked():
    """GradNorm/ApplyStep retries (services.router.expert_calls.StepCall) wait for a reconnecting
    channel; every other call keeps gRPC's fail-fast default."""
    channel = _Channel()
    with ThreadPoolExecutor(1) as calls:
        client = _client(channel, calls)
        client.grad_norm("0.0", step=0, timeout_s=5.0).result()
        client.grad_norm("0.0", step=0, timeout_s=5.0, wait_for_ready=True).result()
        client.apply_step("0.0", step=0, lr=0.1, grad_scale=1.0, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8,
                          timeout_s=5.0, wait_for_ready=True).result()
    assert [c["options"] for c in channel.calls] == [{}, {"wait_for_ready": True}, {"wait_for_ready": True}]


def test_a_call_not_started_yet_can_be_cancelled():
    channel = _Channel()
    release = threading.Event()
    with ThreadPoolExecutor(1) as calls:
        calls.submit(release.wait)
        future = _client(channel, calls).backward("0.0", expert_pb2.ForwardRequest().inputs, call_id="c",
                                                  step=0, timeout_s=5.0)
        assert future.cancel()
        release.set()
    assert future.cancelled() and channel.calls == []


def test_the_pool_shares_its_call_threads_and_starts_them_again_after_close():
    pool = ec.ExpertClientPool()
    try:
        a, b = pool.get("127.0.0.1:1"), pool.get("127.0.0.1:2")
        assert a._calls is b._calls
        pool.close()
        with pytest.raises(RuntimeError):   # closed: nothing is sent any more
            a.grad_norm("0.0", step=0, timeout_s=1.0)
        again = pool.get("127.0.0.1:1")
        assert again is not a and again._calls is not a._calls
    finally:
        pool.close()
