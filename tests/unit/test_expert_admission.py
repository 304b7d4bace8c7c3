"""services.expert.batcher.ComputeWorker.submit: at most `max_pending_tasks` requests wait for the
compute thread; more are refused at once (Overloaded), not queued (asyncio, no sockets)."""

import asyncio
import threading

import pytest

from services.expert.batcher import ComputeWorker, Overloaded


def _scenario(max_pending_tasks):
    async def main():
        worker = ComputeWorker(threads=1, max_pending_tasks=max_pending_tasks)
        gate = threading.Event()
        try:
            blocker = asyncio.ensure_future(worker.run(gate.wait, 10))   # holds the thread, not counted
            await asyncio.sleep(0.05)
            admitted = [asyncio.ensure_future(worker.submit("Backward", lambda i=i: i)) for i in range(2)]
            await asyncio.sleep(0)                         # both are now waiting behind the blocker
            assert worker.pending_tasks == 2
            with pytest.raises(Overloaded, match=r"GradNorm refused: 2 Backward/GradNorm/ApplyStep calls .* "
                                                 r"\(limit 2\)"):
                await worker.submit("GradNorm", lambda: "never run")
            gate.set()
            assert await blocker is True
            assert await asyncio.gather(*admitted) == [0, 1]
            assert worker.pending_tasks == 0
            assert await worker.submit("ApplyStep", lambda: "room again") == "room again"
        finally:
            gate.set()
            worker.shutdown()
    asyncio.run(main())


def test_requests_past_the_limit_are_refused_and_room_comes_back():
    _scenario(max_pending_tasks=2)


def test_a_caller_that_gives_up_frees_its_place_and_its_work_is_dropped():
    async def main():
        worker = ComputeWorker(threads=1, max_pending_tasks=1)
        gate, ran = threading.Event(), []
        try:
            blocker = asyncio.ensure_future(worker.run(gate.wait, 10))
            await asyncio.sleep(0.05)
            waiting = asyncio.ensure_future(worker.submit("Backward", ran.append, "abandoned"))
            await asyncio.sleep(0)
            waiting.cancel()                               # e.g. the RPC's deadline passed
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert worker.pending_tasks == 0
            accepted = asyncio.ensure_future(worker.submit("Backward", ran.append, "kept"))
            gate.set()
            await blocker
            await accepted
            assert ran == ["kept"]
        finally:
            gate.set()
            worker.shutdown()
    asyncio.run(main())


def test_no_limit_when_zero():
    async def main():
        worker = ComputeWorker(threads=1)
        try:
            assert await asyncio.gather(*(worker.submit("GradNorm", lambda i=i: i) for i in range(100))) == \
                list(range(100))
        finally:
            worker.shutdown()
    asyncio.run(main())
