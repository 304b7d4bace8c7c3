"""The validation task queue in Redis (layout: subnet/validation_results.py).

    queue = TaskQueue(redis_client, prefix="moe:validation:")
    queue.enqueue(round=7, hotkey=miner, global_version=3)      # once per (round, miner), ever
    for task in queue.take("worker-1", block_ms=1000):          # XREADGROUP, consumer group `validators`
        stored = queue.complete(task, result)                   # HSETNX + XADD results + XACK, atomically
    queue.reclaim("worker-2", min_idle_s=30)                    # XAUTOCLAIM: tasks whose worker died

Both writes that must not be split are Lua scripts (atomic in Redis): "mark enqueued + XADD",
so a crash cannot leave a task marked but never queued; and "HSETNX result + XADD results
stream (only if stored) + XACK", so a crash cannot store a result that the scorer never hears
of, and a task done twice is stored and announced once. A task whose worker dies stays
pending in the group and is reclaimed after `min_idle_s`.

This class moves tasks and results; it does not evaluate anything.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from subnet.validation_results import TASK_GROUP, ValidationResult

log = logging.getLogger(__name__)
DEFAULT_KEEP_S = 7 * 24 * 3600   # task marks and results expire after this (the scorer reads them within a round)
STREAM_MAXLEN = 100_000          # streams are trimmed (approximately) beyond this many entries

_ENQUEUE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
end
return false
"""

_COMPLETE = """
local stored = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if stored == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'round', ARGV[3], 'hotkey', ARGV[1])
end
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
return stored
"""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Task:
    """One stream entry: validate `hotkey`'s commitment of `round` against `global_version`."""

    entry_id: str
    round: int
    hotkey: str
    global_version: int
    deliveries: int = 1   # how often Redis handed it out (>1: a worker failed or died on it)

    @classmethod
    def parse(cls, entry_id, fields: dict) -> Task:
        f = {_text(k): _text(v) for k, v in fields.items()}
        return cls(_text(entry_id), int(f["round"]), f["hotkey"], int(f.get("global_version", -1)))


class TaskQueue:
    """Tasks in `<prefix>tasks` (group `validators`), results in `<prefix>result:<round>` and
    `<prefix>results`. Thread-safe as far as the redis client is (redis-py's pool is)."""

    def __init__(self, client: redis.Redis, prefix: str, keep_s: float = DEFAULT_KEEP_S):
        self.redis, self.prefix, self.keep_s = client, prefix, int(keep_s)
        self.tasks_key = f"{prefix}tasks"
        self.results_key = f"{prefix}results"
        self._enqueue = client.register_script(_ENQUEUE)
        self._complete = client.register_script(_COMPLETE)
        self.ensure_group()

    def task_key(self, round: int, hotkey: str) -> str:
        return f"{self.prefix}task:{round}:{hotkey}"

    def result_key(self, round: int) -> str:
        return f"{self.prefix}result:{round}"

    def ensure_group(self) -> None:
        """Create the stream and its consumer group (from the start of the stream) unless they exist."""
        try:
            self.redis.xgroup_create(self.tasks_key, TASK_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def enqueue(self, round: int, hotkey: str, global_version: int) -> bool:
        """Queue the task unless this (round, hotkey) was ever queued; True if queued now."""
        fields = ["round", str(round), "hotkey", hotkey, "global_version", str(global_version)]
        entry = self._enqueue(keys=[self.task_key(round, hotkey), self.tasks_key],
                              args=[str(global_version), self.keep_s, STREAM_MAXLEN, *fields])
        return entry is not None

    def take(self, consumer: str, count: int = 1, block_ms: int = 1000) -> list[Task]:
        """New tasks for `consumer` (XREADGROUP >); waits up to `block_ms` for one."""
        reply = self.redis.xreadgroup(TASK_GROUP, consumer, {self.tasks_key: ">"}, count=count, block=block_ms)
        return [Task.parse(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries if fields]

    def reclaim(self, consumer: str, min_idle_s: float, count: int = 10) -> list[Task]:
        """Tasks pending longer than `min_idle_s` (their worker died), now `consumer`'s."""
        entries, cursor = [], "0-0"
        while len(entries) < count:  # XAUTOCLAIM scans the pending list in pages: follow its cursor
            reply = self.redis.xautoclaim(self.tasks_key, TASK_GROUP, consumer, min_idle_time=int(min_idle_s * 1000),
                                          start_id=cursor, count=count - len(entries))
            entries += reply[1] if len(reply) > 1 else []
            cursor = _text(reply[0])
            if cursor == "0-0":
                break
        tasks = []
        for entry_id, fields in entries:
            if not fields:  # trimmed from the stream while pending: nothing left to do
                self.redis.xack(self.tasks_key, TASK_GROUP, entry_id)
                continue
            task = Task.parse(entry_id, fields)
            pending = self.redis.xpending_range(self.tasks_key, TASK_GROUP, min=entry_id, max=entry_id, count=1)
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
            tasks.append(Task(task.entry_id, task.round, task.hotkey, task.global_version, deliveries))
        return tasks

    @contextlib.contextmanager
    def holding(self, task: Task, consumer: str, every_s: float) -> Iterator[None]:
        """While the block runs, reset the task's idle time every `every_s` (XCLAIM JUSTID by its own
        consumer), so a long evaluation is not mistaken for a dead worker and reclaimed."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every_s):
                try:
                    self.redis.xclaim(self.tasks_key, TASK_GROUP, consumer, min_idle_time=0,
                                      message_ids=[task.entry_id], justid=True)
                except redis.exceptions.RedisError as e:  # the task may be reclaimed then; stored once anyway
                    log.warning("could not refresh task %s: %s", task.entry_id, e)

        thread = threading.Thread(target=beat, name=f"hold-{task.entry_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def has_result(self, round: int, hotkey: str) -> bool:
        return bool(self.redis.hexists(self.result_key(round), hotkey))

    def complete(self, task: Task, result: ValidationResult) -> bool:
        """Store `result` unless one is stored (HSETNX), announce it on the results stream only if
        stored now, and acknowledge the task; all in one step. True if this call stored it."""
        if (result.round, result.hotkey) != (task.round, task.hotkey):
            raise ValueError(f"result for round {result.round} {result.hotkey} does not answer task "
                             f"round {task.round} {task.hotkey}")
        stored = self._complete(keys=[self.result_key(task.round), self.results_key, self.tasks_key],
                                args=[task.hotkey, result.to_json(), str(task.round), TASK_GROUP, task.entry_id,
                                      self.keep_s, STREAM_MAXLEN])
        return bool(stored)

    def ack(self, task: Task) -> None:
        self.redis.xack(self.tasks_key, TASK_GROUP, task.entry_id)

    def results(self, round: int) -> dict[str, ValidationResult]:
        return {_text(k): ValidationResult.from_json(v) for k, v in self.redis.hgetall(self.result_key(round)).items()}

    def forget(self, consumer: str) -> None:
        """Remove `consumer` from the group if it holds no pending task (a clean stop)."""
        pending = self.redis.xpending_range(self.tasks_key, TASK_GROUP, min="-", max="+", count=1,
                                            consumername=consumer)
        if not pending:
            self.redis.xgroup_delconsumer(self.tasks_key, TASK_GROUP, consumer)
