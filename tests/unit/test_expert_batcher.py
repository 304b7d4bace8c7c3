"""services.expert.batcher: merging, splitting, limits, cancellation (asyncio, no sockets)."""

import asyncio

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


def _run(scenario, **batcher_kwargs):
    async def main():
        torch.manual_seed(0)
        backend = ExpertBackend({"0.0": SwiGLU(DIM, 16)})
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


def _xs(*sizes):
    return [torch.randn(n, DIM, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(sizes)]


def test_concurrent_requests_run_as_one_computation_and_get_their_own_rows():
    async def scenario(backend, batcher, metrics):
        xs = _xs(3, 1, 5, 2)
        outs = await asyncio.gather(*(batcher.forward("0.0", x) for x in xs))
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
        first = asyncio.create_task(batcher.forward("0.0", _xs(4)[0]))
        await asyncio.sleep(0.05)  # queued, waiting for the batch window
        assert batcher.queued_tokens("0.0") == 4
        with pytest.raises(Overloaded, match="4 tokens queued"):
            await batcher.forward("0.0", _xs(4)[0])
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


def test_training_forwards_keep_activations_per_call():
    async def scenario(backend, batcher, metrics):
        xs = _xs(2, 3)
        await asyncio.gather(batcher.forward("0.0", xs[0], call_id="a"), batcher.forward("0.0", xs[1]))
        assert len(backend.cache) == 1 and backend.cache.peek(("0.0", "a")).x.shape == (2, DIM)
    _run(scenario, max_batch_tokens=100, batch_wait_ms=50)
