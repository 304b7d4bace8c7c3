"""The router's continuous-batching loop: streams join and leave a running batch, one model pass
advances all of them, cancellation and deadlines free their slots, and every stream gets exactly
the tokens it would get alone."""

from __future__ import annotations

import time

import pytest
import torch

from moe import MoELM, preset
from services.router.decode_loop import END, DecodeLoop, Expired, QueueFull, SamplingParams, StreamFailed


def _model(block_size: int = 32):
    torch.manual_seed(0)
    return MoELM(preset("tiny", vocab_size=97, block_size=block_size)).eval()


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(n, 0.0, None, None)


def _drain(stream, timeout: float = 30.0) -> list[int]:
    tokens = []
    while True:
        item = stream.out.get(timeout=timeout)
        if item is END:
            return tokens
        if isinstance(item, BaseException):
            raise item
        tokens.append(item[0])


def _alone(model, prompt, n, temperature=0.0, **kw) -> list[int]:
    return [int(t[0]) for t in model.stream(torch.tensor([prompt]), n, temperature=temperature, **kw)]


class _CountPasses:
    """Counts model passes and the rows of each."""

    def __init__(self, model):
        self.rows: list[int] = []
        model.register_forward_hook(lambda module, args, out: self.rows.append(args[0].shape[0]))


def test_streams_that_join_together_advance_in_one_pass_per_token_and_equal_their_runs_alone():
    model = _model()
    passes = _CountPasses(model)
    loop = DecodeLoop(model, max_batch=8)
    prompts = {"a": ([1, 2, 3], 6), "b": ([9], 3), "c": ([40, 41, 42, 43, 44], 9)}
    try:
        with loop.model_lock:       # hold the loop so all three join at the same step
            streams = {k: loop.submit(p, _greedy(n)) for k, (p, n) in prompts.items()}
        got = {k: _drain(s) for k, s in streams.items()}
    finally:
        loop.close()
    rows = list(passes.rows)   # the loop's passes only: the runs alone come after
    for k, (p, n) in prompts.items():
        assert got[k] == _alone(model, p, n), k
    # One prefill pass for the three (right-padded), then one pass per further token of the longest,
    # with every stream still running in it: c's 8 more tokens, a (5 more) and b (2 more) leaving on the way.
    assert rows == [3, 3, 3, 2, 2, 2, 1, 1, 1]


def test_a_stream_joins_a_running_batch_and_a_finished_one_leaves_it():
    model = _model()
    passes = _CountPasses(model)
    loop = DecodeLoop(model, max_batch=4)
    try:
        long = loop.submit([5, 6], _greedy(20))
        first = long.out.get(timeout=30)          # the long stream is running
        late = loop.submit([7], _greedy(3))
        late_tokens = _drain(late)
        long_tokens = [first[0]] + _drain(long)
    finally:
        loop.close()
    rows = list(passes.rows)   # the loop's passes only: the runs alone come after
    assert long_tokens == _alone(model, [5, 6], 20) and late_tokens == _alone(model, [7], 3)
    # One pass per token of the long stream: the late one's prefill rode along in one of them,
    # its next tokens in the following ones, then it left.
    assert len(rows) == 20 and rows.count(2) == 3 and rows[-1] == 1


def test_cancel_frees_the_slot_for_a_waiting_stream():
    model = _model()
    loop = DecodeLoop(model, max_batch=1, max_queued=4)
    try:
        hog = loop.submit([1], _greedy(10**6))
        hog.out.get(timeout=30)
        with loop.model_lock:
            waiting = loop.submit([2], _greedy(2))
            produced = hog.out.qsize()
        deadline = time.monotonic() + 30
        while hog.out.qsize() < produced + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        with loop.model_lock:                    # three steps later, between two steps:
            assert not waiting.admitted.is_set()  # the only slot is still taken
            hog.cancel()
        assert _drain(waiting) == _alone(model, [2], 2)
        assert loop.active == 0
    finally:
        loop.close()


def test_an_expired_or_cancelled_request_is_never_computed():
    model = _model()
    passes = _CountPasses(model)
    loop = DecodeLoop(model, max_batch=2)
    try:
        with loop.model_lock:
            expired = loop.submit([1, 2], _greedy(3), deadline=time.monotonic() + 0.05)
            cancelled = loop.submit([3], _greedy(3))
            cancelled.cancel()
            job_started = time.monotonic()
            with pytest.raises(Expired):
                loop.run(lambda: model(torch.tensor([[1]])), deadline=time.monotonic() + 0.05)
            assert time.monotonic() - job_started < 20
            time.sleep(0.1)
        assert isinstance(expired.out.get(timeout=30), Expired)
        assert loop.run(lambda: 7) == 7          # the loop is still serving
    finally:
        loop.close()
    assert passes.rows == []


def test_a_full_queue_refuses_at_once():
    model = _model()
    loop = DecodeLoop(model, max_batch=1, max_queued=1)
    try:
        with loop.model_lock:
            loop.submit([1], _greedy(50))   # will take the free slot
            loop.submit([2], _greedy(50))   # will wait for it
            with pytest.raises(QueueFull):
                loop.submit([3], _greedy(1))
    finally:
        loop.close()


def test_seeded_sampling_does_not_depend_on_the_streams_a_request_shares_steps_with():
    model = _model()
    loop = DecodeLoop(model, max_batch=8)

    def sampled(seed):
        return SamplingParams(12, 1.0, 20, torch.Generator().manual_seed(seed))
    try:
        with loop.model_lock:
            streams = [loop.submit([i + 1, i + 2], sampled(i)) for i in range(4)]
        together = [_drain(s) for s in streams]
    finally:
        loop.close()
    alone = [_alone(model, [i + 1, i + 2], 12, temperature=1.0, top_k=20,
                    generator=torch.Generator().manual_seed(i)) for i in range(4)]
    assert together == alone


def test_a_stream_longer_than_the_context_goes_on_like_a_stream_alone():
    model = _model(block_size=16)
    loop = DecodeLoop(model, max_batch=2)
    try:
        with loop.model_lock:
            long = loop.submit(list(range(1, 13)), _greedy(30))
            short = loop.submit([3, 4], _greedy(5))
        got_long, got_short = _drain(long), _drain(short)
    finally:
        loop.close()
    assert got_long == _alone(model, list(range(1, 13)), 30)
    assert got_short == _alone(model, [3, 4], 5)


def test_a_failing_pass_ends_its_streams_with_the_error_and_the_loop_goes_on():
    model = _model()
    loop = DecodeLoop(model, max_batch=2)
    broken = {"on": True}

    def hook(module, args):
        if broken["on"]:
            raise RuntimeError("every replica of expert 0.1 is down")
    handle = model.register_forward_pre_hook(hook)
    try:
        stream = loop.submit([1], _greedy(3))
        with pytest.raises(RuntimeError, match="generation failed: every replica"):
            _drain(stream)
        broken["on"] = False
        handle.remove()
        assert _drain(loop.submit([1], _greedy(3))) == _alone(model, [1], 3)
    finally:
        loop.close()


def test_a_stream_whose_sampling_fails_ends_alone_and_is_logged_once(caplog):
    model = _model()
    loop = DecodeLoop(model, max_batch=8)
    # top_k -1 makes torch.topk raise inside sampling: what any stream-specific sampling failure does
    # (a temperature that turned the logits to NaN did, before it was refused).
    broken = SamplingParams(3, 1.0, -1, None)
    try:
        with caplog.at_level("WARNING", logger="services.router.decode_loop"), loop.model_lock:
            good = [loop.submit([1, 2], _greedy(5)), loop.submit([4], SamplingParams(5, 1.0, 20, None))]
            bad = [loop.submit([i + 5], broken) for i in range(3)]   # all in the same pass as the good ones
        got = _drain(good[0])
        assert len(_drain(good[1])) == 5
        for stream in bad:
            with pytest.raises(StreamFailed, match="sampling the next token failed .RuntimeError: selected index"):
                _drain(stream)
        assert loop.failed_streams == 3
        assert _drain(loop.submit([1], _greedy(3))) == _alone(model, [1], 3)   # the loop goes on
    finally:
        loop.close()
    assert got == _alone(model, [1, 2], 5)
    records = [r for r in caplog.records if r.name == "services.router.decode_loop"]
    assert len(records) == 1 and records[0].levelname == "WARNING" and records[0].exc_info is None
    assert "ended it alone" in records[0].getMessage()


def test_close_ends_waiting_streams_and_refuses_new_ones():
    model = _model()
    loop = DecodeLoop(model, max_batch=1)
    with loop.model_lock:
        stream = loop.submit([1], _greedy(5))
        closer = __import__("threading").Thread(target=loop.close)
        closer.start()
    closer.join(30)
    items = []
    while not stream.out.empty():
        items.append(stream.out.get())
    assert any(isinstance(i, RuntimeError) and "shutting down" in str(i) for i in items) or END in items
    with pytest.raises(RuntimeError, match="shutting down"):
        loop.submit([1], _greedy(1))
