"""services.expert.batcher: merging, splitting, limits, cancellation, lone requests (asyncio, no sockets)."""

import asyncio
import threading

import pytest
import torch

from moe.experts import SwiGLU
from services.expert.backend import ExpertBackend
from services.expert.batcher import Batcher, ComputeWorker, Overloaded
from services.expert.metrics import ExpertMetrics

torch.set_num_threads(1)
DIM = 8


def _batch_stats(metrics, uid="0.0"):
    """(computations, requests, tokens) observed so far."""
    samples = {s.name: s.value for fam in metrics.registry.collect() for s in fam.samples
               if s.labels.get("expert") == uid}
    return (samples.get("expert_batch_requests_count", 0), samples.get("expert_batch_requests_sum", 0),
            samples.get("expert_batch_tokens_sum", 0))


def _run(scenario, uids=("0.0",), **batcher_kwargs):
    async def main():
        torch.manual_seed(0)
        backend = ExpertBackend({uid: SwiGLU(DIM, 16) for uid in uids})
        worker = ComputeWorker(threads=1)
        metrics = ExpertMetrics()
        batcher = Batcher(backend, worker, metrics=metrics, **batcher_kwargs)
        await batcher.start()
        try:
            return await scenario(backend, batcher, metrics)
        finally:
            await batcher.stop()
            worker.shutdown()
    return asyncio.run(main())


def _occupy(worker):
    """Hold the compute thread (as a long Backward would) until the returned event is set."""
    release = threading.Event()
    return release, asyncio.ensure_future(worker.run(release.wait))


async def _turns(n=20):
    """Let the event loop run `n` rounds of ready callbacks; no time passes that a test relies on."""
    for _ in range(n):
        await asyncio.sleep(0)


def _xs(*sizes):
    return [torch.randn(n, DIM, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(sizes)]


def test_concurrent_requests_run_as_one_computation_and_get_their_own_rows():
    async def scenario(backend, batcher, metrics):
        xs = _xs(3, 1, 5, 2)
        outs = await asyncio.wait_for(asyncio.gather(*(batcher.forward("0.0", x) for x in xs)), timeout=30)
        for x, y in zip(xs, outs):
            torch.testing.assert_close(y, backend.forward("0.0", x), rtol=1e-5, atol=1e-6)
        assert _batch_stats(metrics) == (1, 4, 11)
        assert batcher.queued_tokens("0.0") == 0
    _run(scenario, max_batch_tokens=1000, batch_wait_ms=50)


def test_batches_respect_max_batch_tokens():
    async def scenario(backend, batcher, metrics):
        await asyncio.gather(*(batcher.forward("0.0", x) for x in _xs(3, 3, 3, 3, 3)))
        computations, requests, tokens = _batch_stats(metrics)
        assert (requests, tokens) == (5, 15) and computations >= 3  # at most 2 x 3 tokens each
    _run(scenario, max_batch_tokens=6, batch_wait_ms=50)


def test_queue_limit_refuses_with_overloaded_and_load_is_visible():
    async def scenario(backend, batcher, metrics):
        release, busy = _occupy(batcher.worker)   # a lone request goes at once: keep it waiting here
        try:
            first = asyncio.create_task(batcher.forward("0.0", _xs(4)[0]))
            await _turns()
            assert batcher.queued_tokens("0.0") == 4
            with pytest.raises(Overloaded, match="4 tokens queued"):
                await batcher.forward("0.0", _xs(4)[0])
        finally:
            release.set()
        await busy
        await first
    _run(scenario, max_batch_tokens=100, batch_wait_ms=300, max_queue_tokens=6)


def test_a_cancelled_request_is_not_computed():
    async def scenario(backend, batcher, metrics):
        xs = _xs(2, 7, 3)
        tasks = [asyncio.create_task(batcher.forward("0.0", x)) for x in xs]
        await asyncio.sleep(0.02)
        tasks[1].cancel()  # the caller's deadline passed while it waited
        await asyncio.gather(tasks[0], tasks[2])
        assert _batch_stats(metrics) == (1, 2, 5)
    _run(scenario, max_batch_tokens=100, batch_wait_ms=100)


def test_a_lone_request_cancelled_in_its_turn_leaves_no_load_behind():
    """A lone request yields one loop turn before it is computed; cancelled in that turn, its tokens
    must not stay counted as the expert's load (routers avoid loaded replicas: it would never be
    sent another request to clear it)."""
    async def scenario(backend, batcher, metrics):
        [x] = _xs(4)
        task = asyncio.create_task(batcher.forward("0.0", x))
        await asyncio.sleep(0)            # it is queued and yields its turn
        assert batcher.queued_tokens("0.0") == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert batcher.queued_tokens("0.0") == 0
        assert _batch_stats(metrics) == (0, 0, 0)   # and it was never computed
    _run(scenario, max_batch_tokens=100, batch_wait_ms=0)


def test_training_forwards_keep_activations_per_call():
    async def scenario(backend, batcher, metrics):
        xs = _xs(2, 3)
        await asyncio.gather(batcher.forward("0.0", xs[0], call_id="a"), batcher.forward("0.0", xs[1]))
        assert len(backend.cache) == 1 and backend.cache.peek(("0.0", "a")).x.shape == (2, DIM)
    _run(scenario, max_batch_tokens=100, batch_wait_ms=50)


# An hour of batch window: a request that waited for it would never finish within a test, so
# the ones below pass only if the batch went without waiting. No test measures time.
HOUR_MS = 3_600_000


def test_a_lone_request_goes_at_once_when_the_compute_thread_is_idle():
    async def scenario(backend, batcher, metrics):
        x = _xs(3)[0]
        task = asyncio.create_task(batcher.forward("0.0", x))
        await _turns()
        assert _batch_stats(metrics) == (1, 1, 3)   # handed to the compute thread, no wait
        torch.testing.assert_close(await task, backend.forward("0.0", x), rtol=1e-5, atol=1e-6)
    _run(scenario, max_batch_tokens=100, batch_wait_ms=HOUR_MS, inline_max_macs=0)


def test_a_lone_small_request_is_computed_on_the_event_loop_when_the_thread_is_idle():
    async def scenario(backend, batcher, metrics):
        x = _xs(1)[0]
        task = asyncio.create_task(batcher.forward("0.0", x))
        await _turns()   # no thread was involved: the answer is there after a few loop rounds
        assert task.done()
        torch.testing.assert_close(task.result(), backend.forward("0.0", x), rtol=1e-5, atol=1e-6)
    _run(scenario, max_batch_tokens=100, batch_wait_ms=HOUR_MS)


def test_a_small_request_waits_for_the_thread_while_it_is_busy():
    async def scenario(backend, batcher, metrics):
        release, busy = _occupy(batcher.worker)   # e.g. a Backward: the forward must not pass it
        try:
            task = asyncio.create_task(batcher.forward("0.0", _xs(1)[0]))
            await _turns()
            assert _batch_stats(metrics) == (1, 1, 1)   # dispatched at once, queued behind the thread's work
            assert not task.done() and batcher.queued_tokens("0.0") == 1
        finally:
            release.set()
        await busy
        await task
    _run(scenario, max_batch_tokens=100, batch_wait_ms=HOUR_MS)


def test_a_client_calling_again_at_once_does_not_wait_while_the_expert_is_idle():
    async def scenario(backend, batcher, metrics):
        for n in range(1, 4):   # each call as soon as the one before is answered: never any company
            await asyncio.wait_for(batcher.forward("0.0", _xs(1)[0]), timeout=30)
            assert _batch_stats(metrics) == (n, n, n)
    _run(scenario, max_batch_tokens=100, batch_wait_ms=HOUR_MS)   # waiting at all would time out


def test_a_request_arriving_while_the_expert_computes_waits_for_company():
    async def scenario(backend, batcher, metrics):
        release, busy = _occupy(batcher.worker)   # the first request's computation cannot finish yet
        first = asyncio.create_task(batcher.forward("0.0", _xs(1)[0]))
        await _turns()
        second = asyncio.create_task(batcher.forward("0.0", _xs(1)[0]))   # the expert has work: it queues
        await _turns()
        assert _batch_stats(metrics) == (1, 1, 1)   # the first went at once; the second waits for company
        third = asyncio.create_task(batcher.forward("0.0", _xs(1)[0]))
        await _turns()
        release.set()
        await asyncio.gather(busy, first, second, third)
        assert _batch_stats(metrics) == (2, 3, 3)   # the two late ones went as one batch
    _run(scenario, max_batch_tokens=2, batch_wait_ms=HOUR_MS, inline_max_macs=0)   # full at two tokens


def test_requests_that_arrive_together_still_wait_for_company():
    async def scenario(backend, batcher, metrics):
        tasks = [asyncio.create_task(batcher.forward("0.0", x)) for x in _xs(1, 1)]
        await _turns()
        assert _batch_stats(metrics) == (0, 0, 0)   # two in the queue: not alone, so they wait
        late = asyncio.create_task(batcher.forward("0.0", _xs(1)[0]))
        await asyncio.gather(*tasks, late)
        assert _batch_stats(metrics) == (1, 3, 3)
    _run(scenario, max_batch_tokens=3, batch_wait_ms=HOUR_MS)   # full at three tokens


def test_requests_too_large_for_the_loop_go_to_the_thread_without_waiting_a_turn():
    """A router sends a layer's calls to all the experts at once: the first must not wait until every
    other one of that loop turn has been decoded before its computation starts."""
    async def scenario(backend, batcher, metrics):
        first, second = (asyncio.create_task(batcher.forward(uid, x)) for uid, x in zip(("0.0", "0.1"), _xs(3, 3)))
        await asyncio.sleep(0)   # one turn: each ran up to its hand-off
        assert not batcher.worker.idle and _batch_stats(metrics, "0.0") == (1, 1, 3)
        await asyncio.gather(first, second)
    _run(scenario, uids=("0.0", "0.1"), max_batch_tokens=100, batch_wait_ms=HOUR_MS, inline_max_macs=0)


def test_large_requests_arriving_together_the_first_computes_and_the_rest_merge():
    async def scenario(backend, batcher, metrics):
        xs = _xs(1, 1, 1)
        outs = await asyncio.wait_for(asyncio.gather(*(batcher.forward("0.0", x) for x in xs)), timeout=30)
        assert _batch_stats(metrics) == (2, 3, 3)   # the first alone, the other two as one batch
        for x, y in zip(xs, outs):
            torch.testing.assert_close(y, backend.forward("0.0", x), rtol=1e-5, atol=1e-6)
    _run(scenario, max_batch_tokens=2, batch_wait_ms=HOUR_MS, inline_max_macs=0)   # full at two tokens


def test_the_worker_stays_busy_until_its_thread_is_done_even_when_the_caller_left():
    async def scenario(backend, batcher, metrics):
        worker = batcher.worker
        started, release = threading.Event(), threading.Event()

        def hold():
            started.set()
            release.wait()
        busy = asyncio.ensure_future(worker.run(hold))
        await asyncio.to_thread(started.wait)
        busy.cancel()   # the caller went away; the thread still runs its work
        await _turns()
        assert not worker.idle
        release.set()
        await worker.run(lambda: None)   # queued behind the abandoned work: both are done now
        assert worker.idle
    _run(scenario, max_batch_tokens=100, batch_wait_ms=50)


def test_forward_many_of_lone_experts_computes_each_at_once_and_correctly():
    async def scenario(backend, batcher, metrics):
        x0, x1 = _xs(3, 2)
        y0, y1 = await batcher.forward_many([("0.0", x0), ("0.1", x1)])
        torch.testing.assert_close(y0, backend.module("0.0")(x0).detach())
        torch.testing.assert_close(y1, backend.module("0.1")(x1).detach())
        assert _batch_stats(metrics, "0.0") == (1, 1, 3) and _batch_stats(metrics, "0.1") == (1, 1, 2)
        assert batcher.queued_tokens("0.0") == batcher.queued_tokens("0.1") == 0
    _run(scenario, ("0.0", "0.1"), max_batch_tokens=64, batch_wait_ms=10_000)


def test_forward_many_joins_the_queues_when_an_expert_has_company_waiting():
    async def scenario(backend, batcher, metrics):
        x_wait, x0, x1 = _xs(2, 3, 1)
        release, busy = _occupy(batcher.worker)
        first = asyncio.ensure_future(batcher.forward("0.0", _xs(1)[0]))   # alone: computing (held)
        await _turns()
        waiting = asyncio.ensure_future(batcher.forward("0.0", x_wait))     # 0.0 has work: it queues
        await _turns()
        many = asyncio.ensure_future(batcher.forward_many([("0.0", x0), ("0.1", x1)]))
        await _turns()
        assert not many.done()      # 0.0's rows wait in its queue with the request before them
        batcher.max_batch_tokens = 5   # a full batch goes at once: the waiting request and these rows
        batcher._queues["0.0"].changed.set()
        release.set()
        await asyncio.gather(busy, first)
        y0, y1 = await many
        torch.testing.assert_close(await waiting, backend.module("0.0")(x_wait).detach())
        torch.testing.assert_close(y0, backend.module("0.0")(x0).detach())
        torch.testing.assert_close(y1, backend.module("0.1")(x1).detach())
        assert _batch_stats(metrics, "0.0")[:2] == (2, 3)   # the lone first request, then one batch of two
    _run(scenario, ("0.0", "0.1"), max_batch_tokens=64, batch_wait_ms=10_000)
