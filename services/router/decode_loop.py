"""Continuous batching: one thread advances every active Generate stream together.

    loop = DecodeLoop(model, max_batch=64, max_queued=256, metrics=metrics)
    stream = loop.submit(prompt_ids, params, deadline=...)     # Overloaded when the queue is full
    for item in stream: ...                                    # (token id, masked calls), see below
    loop.run(lambda: model(idx), deadline=...)                 # a Logits pass, between two steps
    loop.close()

Each iteration of the loop (vLLM's engine loop is the model):
1. runs the Logits passes that are waiting (one model forward each);
2. admits waiting streams while a slot is free (at most `max_batch` streams advance together);
3. advances every active stream in ONE forward: the new ones by their whole prompt (prefill,
   each in its own slot of a `moe.slot_cache.SlotCache`), the others by their last token, every
   row right-padded to the longest; each MoE layer makes one call per expert for the tokens of
   all streams, instead of one per stream. A stream whose context is full is prefilled again
   from its last block_size/2 tokens, as `MoELM.stream` does;
4. samples each stream's next token with its own parameters and generator (a stream whose
   sampling fails ends alone, with StreamFailed; the others go on);
5. retires the finished, cancelled and expired streams; their slots are free at once.

A stream's tokens go into its own queue and the loop never waits for a reader: a client that
stops reading holds up only itself (its queue grows to at most max_new_tokens entries). Each
stream samples with its own generator, so a seeded request gives the same tokens whoever it
shares steps with (up to float rounding of batched matmuls). A stream whose deadline passes,
or whose reader cancels, is dropped before the next step; one that never got a slot is never
computed. The model is touched only by this thread (and under `model_lock`, which tests hold
to stall it). Each pass runs in the context of a request that submitted it (for a batched
step, its first stream's), so the expert calls' trace spans have a parent.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moe import MoELM
from moe.lm import sample_next
from moe.slot_cache import SlotCache
from subnet.log_throttle import LogThrottle

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More streams wait for a slot than the loop queues."""


class Expired(RuntimeError):
    """The deadline passed before the work was done (or before it started)."""


class StreamFailed(RuntimeError):
    """Computing a stream's next token failed (its pass, or its own sampling); the stream ended."""


class ShuttingDown(RuntimeError):
    """The loop is closed (the router is stopping): nothing new is taken, and waiting or active
    streams end with this."""


END = object()   # the last item of a stream's queue after its final token
# One warning at most per this many seconds for streams whose sampling failed: a request that makes
# sampling fail on purpose must not flood the log.
FAILURE_LOG_INTERVAL_S = 10.0


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float
    top_k: int | None
    generator: torch.Generator | None


@dataclass(eq=False)
class Stream:
    """One Generate request inside the loop. Its reader takes items from `out`: (token id, masked
    calls) tuples, then END, or an exception (Expired, or StreamFailed: what broke the step)."""

    ids: list[int]
    params: SamplingParams
    deadline: float | None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    admitted: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    left: int = 0
    slot: int | None = None
    prefill: bool = True
    # The submitter's context (its trace span): expert calls made for this stream are its children.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)

    def __post_init__(self):
        self.left = self.params.max_new_tokens

    def cancel(self) -> None:
        """The reader went away: the loop drops the stream before its next step."""
        self.cancelled.set()


@dataclass(eq=False)
class _Job:
    fn: Callable[..., object]
    deadline: float | None
    args: tuple = ()
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None


def _expired(deadline: float | None, now: float) -> bool:
    return deadline is not None and deadline <= now


class DecodeLoop:
    def __init__(self, model: MoELM, max_batch: int = 64, max_queued: int = 256, metrics=None):
        if max_batch < 1 or max_queued < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queued >= 0, got {max_batch}, {max_queued}")
        self.model = model
        self.max_batch, self.max_queued = max_batch, max_queued
        self.metrics = metrics
        self.model_lock = threading.Lock()       # held while the loop computes
        self._cond = threading.Condition()
        self._waiting: deque[Stream] = deque()
        self._jobs: deque[_Job] = deque()
        self._active: list[Stream] = []
        self._cache = SlotCache.for_model(model, slots=1)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.failed_streams = 0                  # streams ended by their own sampling failing (tests read it)
        self._failure_log = LogThrottle(FAILURE_LOG_INTERVAL_S)

    # ---- the callers' side -------------------------------------------------------------------

    def submit(self, ids: Sequence[int], params: SamplingParams, deadline: float | None = None) -> Stream:
        """Queue a stream; it joins the running batch at the next step with a free slot."""
        stream = Stream(list(ids), params, deadline)
        with self._cond:
            self._check_open()
            free = self.max_batch - len(self._active)
            if len(self._waiting) >= self.max_queued + free:
                raise QueueFull(f"{len(self._waiting)} requests already wait for one of {self.max_batch} slots")
            self._waiting.append(stream)
            self._start()
            self._cond.notify()
        return stream

    def run(self, fn: Callable[[], object], deadline: float | None = None, wait_s: float | None = None):
        """Run `fn` (a model pass) on the loop's thread between two steps; its result.
        Expired when `deadline` (time.monotonic) or `wait_s` passes first; then `fn` never runs."""
        job = _Job(contextvars.copy_context().run, deadline, args=(fn,))
        with self._cond:
            self._check_open()
            self._jobs.append(job)
            self._start()
            self._cond.notify()
        limits = [x for x in (wait_s, None if deadline is None else deadline - time.monotonic()) if x is not None]
        if not job.done.wait(timeout=max(0.0, min(limits)) if limits else None):
            job.cancelled.set()
            if not job.done.is_set():     # it may have finished in between: then take its result
                raise Expired("the model stayed busy with other requests until the deadline")
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        """Stop the loop; waiting and active streams end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        with self._cond:
            return len(self._active)

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDown("the router is shutting down; try another router or again later")

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
            self._thread.start()

    # ---- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._jobs or self._active):
                    self._cond.wait()
                if self._closed:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            with self.model_lock, torch.no_grad():
                for job in jobs:
                    self._run_job(job)
                try:
                    self._admit()
                    self._step()
                except Exception as e:   # a bug here must end the streams, not the thread serving them
                    log.exception("the decode loop failed; ending its streams")
                    self._fail_active(StreamFailed(f"generation failed: {e}"))
        self._fail_all(ShuttingDown("the router is shutting down; try another router or again later"))

    def _run_job(self, job: _Job) -> None:
        if job.cancelled.is_set() or _expired(job.deadline, time.monotonic()):
            job.error = Expired("the deadline passed before the model was free")
        else:
            try:
                job.result = job.fn(*job.args)
            except Exception as e:   # the caller gets it; the loop goes on
                job.error = e
        job.done.set()

    def _admit(self) -> None:
        now = time.monotonic()
        with self._cond:
            while self._waiting and len(self._active) < self.max_batch:
                stream = self._waiting.popleft()
                if stream.cancelled.is_set():
                    continue
                if _expired(stream.deadline, now):
                    stream.out.put(Expired("the deadline passed before the model was free"))
                    continue
                used = {s.slot for s in self._active}
                stream.slot = next(i for i in range(self.max_batch) if i not in used)
                self._cache.ensure(stream.slot + 1)
                self._active.append(stream)
                stream.admitted.set()
        if self.metrics is not None:
            self.metrics.active_streams.set(len(self._active))

    def _step(self) -> None:
        now = time.monotonic()
        for stream in self._active:
            if stream.cancelled.is_set():
                stream.left = 0
            elif _expired(stream.deadline, now):
                stream.out.put(Expired("the deadline passed between two tokens"))
                stream.left = 0
        block = self.model.cfg.block_size
        live = [s for s in self._active if s.left > 0]
        prefill = [s for s in live if s.prefill or self._cache.lengths[s.slot] + 1 > block]
        decode = [s for s in live if s not in prefill]
        # New streams, and those whose context is full, (re)start their slots from the tail of their ids.
        feeds = {s: s.ids[-block:] if s.prefill else s.ids[-(block // 2):] for s in prefill}
        for stream in prefill:
            self._cache.reset(stream.slot)
            stream.prefill = False
        feeds.update({s: s.ids[-1:] for s in decode})
        width = max((len(f) for f in feeds.values()), default=1)
        started, produced = time.perf_counter(), 0
        # Joining costs the running streams no extra pass: prefills and one-token steps share one pass,
        # every feed right-padded to the longest (padding sits after each row's real tokens, so causal
        # attention keeps it out of their results; its keys are trimmed from the cache after). Expert
        # calls cost per call far more than per token, so the padding is cheap. A row too close to the
        # end of the context to hold the padding takes a pass of its own.
        together = [s for s in live if self._cache.lengths[s.slot] + width <= block]
        for group in (together, [s for s in live if s not in together]):
            if group:
                produced += self._pass(group, [feeds[s] for s in group])
        if self.metrics is not None and produced:
            self.metrics.tokens_per_second.set(produced / max(time.perf_counter() - started, 1e-9))
        self._retire()

    def _pass(self, streams: list[Stream], feeds: list[list[int]]) -> int:
        """One right-padded pass of `feeds` (one per stream); the tokens handed out."""
        width = max(len(f) for f in feeds)
        starts = [self._cache.lengths[s.slot] for s in streams]
        idx = torch.tensor([f + [0] * (width - len(f)) for f in feeds], dtype=torch.long)
        if not self._forward(streams, idx, last=[len(f) - 1 for f in feeds]):
            return 0
        for stream, start, feed in zip(streams, starts, feeds):
            self._cache.trim(stream.slot, start + len(feed))
        return len(streams)

    def _forward(self, streams: list[Stream], idx: torch.Tensor, last: list[int] | None = None) -> bool:
        """One model pass for `streams` (one row each); samples from each row's position `last[row]`
        (default: the last) and hands out a token per stream. False: the pass failed, and the
        streams ended with the error."""
        self._cache.bind([s.slot for s in streams])
        try:
            # A batched step serves several requests but has one parent span: the first stream's.
            logits, _ = streams[0].context.run(self.model, idx, cache=self._cache)
        except Exception as e:
            log.exception("a decode step failed for %d stream(s)", len(streams))
            for stream in streams:
                stream.out.put(StreamFailed(f"generation failed: {e}"))
                stream.left = 0
            return False
        masked = int(self.model.last_stats.get("masked_calls", 0))
        if self.metrics is not None:
            self.metrics.decode_batch.observe(len(streams))
        positions = [-1] * len(streams) if last is None else last
        # Greedy rows take one argmax together: per row, its fixed cost is a good part of a step's
        # own CPU time at 16 and more streams.
        greedy = [row for row, stream in enumerate(streams) if stream.params.temperature == 0]
        tokens = dict(zip(greedy, logits[greedy, [positions[row] for row in greedy]].argmax(dim=-1).tolist()))
        for row, stream in enumerate(streams):
            p = stream.params
            token = tokens.get(row)
            if token is None:
                try:
                    token = int(sample_next(logits[row:row + 1, positions[row]], p.temperature, p.top_k,
                                            p.generator)[0, 0])
                except Exception as e:   # this stream's parameters or logits: it alone ends, the others go on
                    self._sampling_failed(stream, e)
                    continue
            stream.ids.append(token)
            stream.left -= 1
            stream.out.put((token, masked))
        return True

    def _sampling_failed(self, stream: Stream, error: Exception) -> None:
        """End `stream` with the error; one log line per FAILURE_LOG_INTERVAL_S at most, without a
        traceback (a request can cause it on purpose, and each would be the same)."""
        stream.out.put(StreamFailed(f"sampling the next token failed ({error.__class__.__name__}: "
                                    f"{str(error)[:200]})"))
        stream.left = 0
        self.failed_streams += 1
        self._failure_log.warning(log, "sampling failed for a stream (temperature %g, top_k %s), ended it alone: "
                                  "%s: %s", stream.params.temperature, stream.params.top_k,
                                  error.__class__.__name__, str(error)[:200])

    def _retire(self) -> None:
        with self._cond:
            done = [s for s in self._active if s.left <= 0]
            for stream in done:
                if not stream.cancelled.is_set():
                    stream.out.put(END)
                self._cache.reset(stream.slot)
            self._active = [s for s in self._active if s.left > 0]
        if self.metrics is not None:
            self.metrics.active_streams.set(len(self._active))

    def _fail_active(self, error: Exception) -> None:
        with self._cond:
            for stream in self._active:
                stream.out.put(error)
                self._cache.reset(stream.slot)
            self._active = []

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            for stream in [*self._waiting, *self._active]:
                stream.out.put(error)
            self._waiting.clear()
            self._active = []
            for job in self._jobs:
                job.error = error
                job.done.set()
            self._jobs.clear()
