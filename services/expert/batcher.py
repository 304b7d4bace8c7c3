"""Dynamic batching (hivemind's task pool, in asyncio) and the one compute thread.

`Batcher.forward` queues a request for one expert and awaits its output. One asyncio task
per expert takes the queue's head, waits up to `batch_wait_ms` for more requests (or until
`max_batch_tokens` are queued), runs them as one `backend.forward_batch` on the
`ComputeWorker`, and hands every request its own rows back. While a batch computes, the
next one gathers, so batches grow by themselves under load. A request that arrives to an idle
expert is computed at once, without its queue (`Batcher._alone`): after one loop turn for company when it
is small enough to run on the loop, straight to the compute thread when it is not.

`ComputeWorker` is a single thread: forwards, backwards and optimizer steps are ordered, so
they never see half-updated weights. The event loop runs no torch but a forward batch
smaller than its hand-off to the thread (`INLINE_MAX_MACS`), and only while the thread is
idle (which keeps that order) and nothing else is queued (`Batcher._quiet`). The
requests that go to it directly (Backward, GradNorm, ApplyStep) pass its admission check
(`submit`): at most `max_pending_tasks` of them wait or run at once, more is Overloaded,
so a flood of Backwards queues neither without bound nor in memory (each holds its tensors).
Forward is bounded by the batcher's own `max_queue_tokens`.

Backward is not batched; it goes straight to the worker. Its cost is the parameter-gradient
matmuls over the call's own tokens, which merging would not shrink; synchronous training
sends one Backward per expert per micro-batch, so there is rarely anything to merge; and
accumulating call by call keeps the gradient sums in the order in-process autograd uses.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from services.expert.backend import ExpertBackend
from services.expert.metrics import ExpertMetrics

log = logging.getLogger(__name__)
# A forward batch this small (multiply-adds; 16M is about a millisecond of one core) runs on the
# event loop when the compute thread is idle (`ComputeWorker.run_small`): one decode token of the
# small preset is 0.2M; one of dim 1024, inter_dim 2816 is 8.7M.
INLINE_MAX_MACS = 1 << 24


class Overloaded(Exception):
    """The expert's queue is full; the caller should try another replica (RESOURCE_EXHAUSTED)."""


class ShuttingDown(Exception):
    """The batcher stopped before the request ran (UNAVAILABLE)."""


class ComputeWorker:
    """One thread that runs every torch call of the service, in submission order."""

    def __init__(self, threads: int = 0, max_pending_tasks: int = 0):
        """`max_pending_tasks`: requests `submit` lets wait or run at once; 0 = no limit."""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-compute",
                                        initializer=partial(_set_threads, threads))
        self.max_pending_tasks = max_pending_tasks
        self.pending_tasks = 0   # submitted and not finished; changed on the event loop only
        # Every `run` queued or running on the thread; counted down when the thread is done with
        # it, not when its caller stops waiting (a cancelled caller leaves the work running).
        self._busy = 0

    @property
    def idle(self) -> bool:
        """Nothing queued or running on the compute thread (as the event loop sees it)."""
        return self._busy == 0

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the compute thread, unconditionally (forward batches, weight snapshots)."""
        loop = asyncio.get_running_loop()
        future = self._pool.submit(fn, *args, **kwargs)
        self._busy += 1
        # Registered before wrap_future's own callback: the count is down when the caller resumes.
        future.add_done_callback(lambda _: _call_soon(loop, self._done))
        return await asyncio.wrap_future(future, loop=loop)

    async def run_small(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`run` for work smaller than its hand-off (two thread wake-ups, most of a one-token forward):
        when the compute thread is idle, `fn` runs right here on the event loop, still in order,
        since nothing was submitted before it and nothing can be while it runs; else as `run`."""
        if self.idle:
            return fn(*args, **kwargs)
        return await self.run(fn, *args, **kwargs)

    def _done(self) -> None:
        self._busy -= 1

    async def submit(self, rpc: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`run` for the work of one request `rpc`; Overloaded when `max_pending_tasks` already wait.
        A caller that goes away (deadline, cancel) before its turn frees its place and its work is dropped."""
        if self.max_pending_tasks and self.pending_tasks >= self.max_pending_tasks:
            raise Overloaded(f"{rpc} refused: {self.pending_tasks} Backward/GradNorm/ApplyStep calls already wait "
                             f"for this service's compute thread (limit {self.max_pending_tasks}); retry later or "
                             f"on another replica")
        self.pending_tasks += 1
        try:
            return await self.run(fn, *args, **kwargs)
        finally:
            self.pending_tasks -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop is closed: nobody is left to tell
        pass


@dataclass
class _Task:
    x: torch.Tensor             # (n, dim)
    call_id: str | None         # set = training Forward
    future: asyncio.Future
    enqueued: float             # loop time

    @property
    def tokens(self) -> int:
        return self.x.shape[0]


class _Queue:
    def __init__(self) -> None:
        self.tasks: deque[_Task] = deque()
        self.waiting_tokens = 0
        self.running_tokens = 0
        self.changed = asyncio.Event()


class Batcher:
    """Groups concurrent Forward requests per expert into one computation. Does not validate
    requests (the servicer did) and does not run Backward (see `ExpertServicer.Backward`)."""

    def __init__(self, backend: ExpertBackend, worker: ComputeWorker, max_batch_tokens: int,
                 batch_wait_ms: float, max_queue_tokens: int = 0, metrics: ExpertMetrics | None = None,
                 inline_max_macs: int = INLINE_MAX_MACS):
        """`inline_max_macs`: forward batches up to this many multiply-adds may run on the event loop
        (`ComputeWorker.run_small`); 0 = always on the compute thread."""
        self.backend = backend
        self.worker = worker
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        self.inline_max_macs = inline_max_macs
        self._macs_per_token = 3 * backend.dim * backend.inter_dim   # the three matmuls of SwiGLU
        self._queues: dict[str, _Queue] = {}
        self._loops: list[asyncio.Task] = []

    async def start(self) -> None:
        for uid in self.backend.uids:
            self._queues[uid] = _Queue()
            self._loops.append(asyncio.create_task(self._run(uid), name=f"batcher-{uid}"))

    def queued_tokens(self, uid: str) -> int:
        """Tokens accepted for `uid` and not yet answered (waiting or computing): the load."""
        q = self._queues.get(uid)
        return 0 if q is None else q.waiting_tokens + q.running_tokens

    async def forward(self, uid: str, x: torch.Tensor, call_id: str | None = None) -> torch.Tensor:
        q = self._queues.get(uid)
        if q is None:
            raise ShuttingDown(f"the batcher is not running for expert {uid!r}")
        load = self.queued_tokens(uid)
        if self.max_queue_tokens and load and load + x.shape[0] > self.max_queue_tokens:
            raise Overloaded(f"expert {uid} has {load} tokens queued (limit {self.max_queue_tokens}); "
                             f"retry later or on another replica")
        alone = self._alone(q)
        if alone and x.shape[0] * self._macs_per_token > self.inline_max_macs:
            # Too large to run on the event loop: straight to the compute thread, not queued. Waiting a
            # turn for company would put it behind the decoding of every request of that turn (a router
            # sends a layer's calls to all its experts at once: 2-4 ms before the first matmul starts),
            # and the requests that come meanwhile merge while it computes.
            return (await self._direct([(uid, x, call_id)], [q]))[0]
        loop = asyncio.get_running_loop()
        task = _Task(x, call_id, loop.create_future(), loop.time())
        q.tasks.append(task)
        q.waiting_tokens += task.tokens
        self._report(uid)
        if alone:
            # One turn of the loop for requests already on their way (a burst of them arrives in the
            # same turn) to join it; still alone after that, it is computed here, without the queue's
            # task and its two wake-ups. Any that joined woke the queue, which batches them all.
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                task.future.cancel()   # a batch that took it skips it
                if task in q.tasks:    # still waiting: take it back, or its tokens would count as load
                    q.tasks.remove(task)
                    q.waiting_tokens -= task.tokens
                    self._report(uid)
                raise
            if len(q.tasks) == 1 and q.tasks[0] is task and not q.running_tokens:
                q.tasks.popleft()
                q.waiting_tokens -= task.tokens
                return (await self._direct([(uid, x, call_id)], [q]))[0]
        q.changed.set()
        return await task.future

    async def forward_many(self, items: Sequence[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Inference rows of several experts at once (ForwardMany). When each of them arrives alone
        (`_alone`: nothing waiting or computing for it), each queue would compute it at once anyway;
        they then run here, one `forward_batch` per expert in a single hand-off (or on the event loop,
        when small and the compute thread is idle), without a queue task and its wake-ups per expert.
        Otherwise each joins its expert's queue, as a Forward."""
        queues = [self._queues.get(uid) for uid, _ in items]
        if any(q is None for q in queues):
            raise ShuttingDown("the batcher is not running for every expert of this call")
        if not all(self._alone(q) for q in queues):
            return list(await asyncio.gather(*(self.forward(uid, x) for uid, x in items)))
        return await self._direct([(uid, x, None) for uid, x in items], queues)

    async def _direct(self, items: Sequence[tuple[str, torch.Tensor, str | None]],
                      queues: Sequence[_Queue]) -> list[torch.Tensor]:
        """Requests that each arrive alone (`_alone`), computed without their queues: one
        `forward_batch` per expert in a single hand-off (or on the event loop, when small and the
        compute thread is idle). Their queues count them as running meanwhile, so a request that
        arrives during the computation queues (and batches) as usual."""
        tokens = 0
        for (uid, x, _), q in zip(items, queues):
            q.running_tokens += x.shape[0]
            tokens += x.shape[0]
            self._report(uid)
            if self.metrics is not None:
                self.metrics.observe_batch(uid, 1, x.shape[0])

        def compute() -> list[torch.Tensor]:
            return [self.backend.forward_batch(uid, [x], [call_id])[0] for uid, x, call_id in items]

        try:
            return await self._runner(tokens)(compute)
        finally:
            for (uid, x, _), q in zip(items, queues):
                q.running_tokens -= x.shape[0]
                self._report(uid)

    async def _run(self, uid: str) -> None:
        q = self._queues[uid]
        loop = asyncio.get_running_loop()
        while True:
            while not q.tasks:
                q.changed.clear()
                await q.changed.wait()
            deadline = q.tasks[0].enqueued + self.batch_wait_s
            while not self._due(q) and (remaining := deadline - loop.time()) > 0:
                q.changed.clear()
                try:
                    await asyncio.wait_for(q.changed.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(q)
            if batch:
                await self._compute(uid, q, batch)

    def _alone(self, q: _Queue) -> bool:
        """Whether a request arriving now arrives alone: to an idle expert (nothing waiting or
        computing for it). Then it waits for no company: while the expert is idle, waiting only adds
        latency (a decode step's request per expert and layer would pay the whole wait at every layer,
        and a client that calls again as soon as it has its answer, 2 ms per call). Under load, requests
        arrive while others wait or compute: those wait and merge (a burst of the same loop turn too).
        Before 2026-12-06 a request also had to come a whole batch wait after the one before it; that
        made back-to-back calls of one client take 3.0 ms instead of 0.75 (one token, the small preset)."""
        return not q.tasks and not q.running_tokens

    def _due(self, q: _Queue) -> bool:
        """Whether the queue's batch goes before its wait is over: it is full."""
        return q.waiting_tokens >= self.max_batch_tokens

    def _take(self, q: _Queue) -> list[_Task]:
        """The head of the queue up to max_batch_tokens (always at least one request)."""
        batch: list[_Task] = []
        tokens = 0
        while q.tasks:
            task = q.tasks[0]
            if batch and tokens + task.tokens > self.max_batch_tokens:
                break
            q.tasks.popleft()
            q.waiting_tokens -= task.tokens
            if task.future.done():  # the caller gave up (deadline, cancel): skip its work
                continue
            batch.append(task)
            tokens += task.tokens
        return batch

    async def _compute(self, uid: str, q: _Queue, batch: list[_Task]) -> None:
        tokens = sum(t.tokens for t in batch)
        q.running_tokens += tokens
        self._report(uid)
        if self.metrics is not None:
            self.metrics.observe_batch(uid, len(batch), tokens)
        try:
            outputs = await self._runner(tokens)(
                self.backend.forward_batch, uid, [t.x for t in batch], [t.call_id for t in batch])
        except asyncio.CancelledError:
            for t in batch:
                if not t.future.done():
                    t.future.set_exception(ShuttingDown(f"expert {uid} is shutting down"))
            raise
        except Exception as e:  # every waiting caller gets the failure
            log.exception("forward batch of %d requests for expert %s failed", len(batch), uid)
            for t in batch:
                if not t.future.done():
                    t.future.set_exception(e)
        else:
            for t, y in zip(batch, outputs):
                if not t.future.done():
                    t.future.set_result(y)
        finally:
            q.running_tokens -= tokens
            self._report(uid)

    def _runner(self, tokens: int) -> Callable[..., Any]:
        """How a forward of `tokens` (already counted as running) is computed: on the event loop
        when small and quiet (`ComputeWorker.run_small`), else on the compute thread."""
        inline = tokens * self._macs_per_token <= self.inline_max_macs and self._quiet(tokens)
        return self.worker.run_small if inline else self.worker.run

    def _quiet(self, own_tokens: int) -> bool:
        """Nothing but this computation (`own_tokens`, already counted as running) is queued or
        computing for any expert. Only then may a small forward run on the event loop: under load the
        loop has other requests to decode, verify and answer, and blocking it for the compute would
        serialize what the compute thread lets overlap."""
        return all(not q.tasks for q in self._queues.values()) and \
            sum(q.running_tokens for q in self._queues.values()) == own_tokens

    def _report(self, uid: str) -> None:
        if self.metrics is not None:
            self.metrics.queue_tokens_of(uid).set(self.queued_tokens(uid))

    async def stop(self) -> None:
        """Stop batching; requests still queued fail with ShuttingDown."""
        for t in self._loops:
            t.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        for uid, q in self._queues.items():
            for task in q.tasks:
                if not task.future.done():
                    task.future.set_exception(ShuttingDown(f"expert {uid} is shutting down"))
            q.tasks.clear()
        self._queues.clear()
