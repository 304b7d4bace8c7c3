"""The validation task queue on a real Redis: a task is enqueued once; a worker SIGKILLed after it
took a task leaves it pending, another worker reclaims it after the idle time and finishes it;
the result is stored and announced exactly once, even when the task is done twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.validator.task_queue import TaskQueue
from subnet.processes import die_with_parent
from subnet.validation_results import TASK_GROUP, ValidationResult

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# A worker that takes one task and dies before acknowledging it (it "crashes" mid-evaluation).
VICTIM = """
import sys, time, redis
from services.validator.task_queue import TaskQueue
q = TaskQueue(redis.Redis.from_url(sys.argv[1]), sys.argv[2])
tasks = q.take("victim", block_ms=5000)
print(",".join(t.hotkey for t in tasks), flush=True)
time.sleep(60)
"""


@pytest.fixture
def queue(redis_client):
    prefix = f"test:validator-queue:{uuid.uuid4().hex[:8]}:"
    yield TaskQueue(redis_client, prefix)
    for key in redis_client.scan_iter(match=prefix + "*"):
        redis_client.delete(key)


def result(round: int, hotkey: str, loss_delta: float) -> ValidationResult:
    return ValidationResult(round=round, hotkey=hotkey, verified=True, loss_delta=loss_delta)


def test_enqueue_is_once_per_round_and_miner(queue):
    assert queue.enqueue(3, "miner-a", global_version=1)
    assert not queue.enqueue(3, "miner-a", global_version=2)  # another validator, or a repeated phase
    assert queue.enqueue(4, "miner-a", global_version=2)
    assert queue.redis.xlen(queue.tasks_key) == 2


def test_killed_worker_task_is_reclaimed_and_stored_once(queue, redis_server):
    assert queue.enqueue(5, "miner-a", global_version=0)
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, redis_server.url, queue.prefix], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
                              preexec_fn=die_with_parent)  # noqa: PLW1509
    try:
        assert victim.stdout.readline().strip() == "miner-a"  # it holds the task now
    finally:
        victim.kill()
        victim.wait()
    assert queue.redis.xpending(queue.tasks_key, TASK_GROUP)["pending"] == 1
    assert queue.take("rescuer", block_ms=100) == []            # not handed out again as new
    assert queue.reclaim("rescuer", min_idle_s=30) == []        # not idle long enough yet

    time.sleep(0.3)
    [task] = queue.reclaim("rescuer", min_idle_s=0.2)
    assert (task.round, task.hotkey, task.deliveries) == (5, "miner-a", 2)
    assert queue.complete(task, result(5, "miner-a", 0.25))
    assert queue.redis.xpending(queue.tasks_key, TASK_GROUP)["pending"] == 0

    # The same task done a second time (a slow worker that was presumed dead): stored once.
    assert not queue.complete(task, result(5, "miner-a", -1.0))
    assert queue.results(5)["miner-a"].loss_delta == 0.25
    announced = queue.redis.xrange(queue.results_key)
    assert [(f[b"round"], f[b"hotkey"]) for _, f in announced] == [(b"5", b"miner-a")]


def test_complete_refuses_a_result_for_another_task(queue):
    queue.enqueue(6, "miner-b", global_version=0)
    [task] = queue.take("w", block_ms=100)
    with pytest.raises(ValueError, match="does not answer"):
        queue.complete(task, result(6, "miner-c", 0.0))
    queue.forget("w")  # it still holds the task: the consumer is kept
    assert any(c["name"] == b"w" for c in queue.redis.xinfo_consumers(queue.tasks_key, TASK_GROUP))


def test_reclaim_takes_at_most_count_and_forget_drops_an_idle_consumer(queue):
    for hotkey in ("m1", "m2", "m3"):
        queue.enqueue(7, hotkey, global_version=0)
    assert len(queue.take("dead", count=3, block_ms=100)) == 3
    time.sleep(0.15)
    first = queue.reclaim("alive", min_idle_s=0.1, count=2)
    assert len(first) == 2
    for task in first:
        queue.complete(task, result(7, task.hotkey, 0.0))
    rest = queue.reclaim("alive", min_idle_s=0.1, count=2)
    assert sorted(t.hotkey for t in first + rest) == ["m1", "m2", "m3"]
    queue.complete(rest[0], result(7, rest[0].hotkey, 0.0))
    queue.forget("dead")  # holds nothing now: removed
    names = {c["name"] for c in queue.redis.xinfo_consumers(queue.tasks_key, TASK_GROUP)}
    assert b"dead" not in names and b"alive" in names
