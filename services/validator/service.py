"""The validator service: worker threads on the task stream, a PhaseWatcher on the chain, metrics.

    service = ValidatorService(validator, config).start()
    ...
    service.stop()        # SIGTERM: stop taking tasks, let the ones in progress finish (VALIDATOR_GRACE_S)

In the validate phase of round r the watcher enqueues r's tasks (every validator may: a task
is enqueued once); the workers of every validator process sharing the Redis take them. In
the merge phase it merges r on its own thread, waiting up to half the phase for the last
results, so the watcher keeps polling.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from services.validator.config import ValidatorConfig
from services.validator.validator import Validator
from subnet.rounds import PhaseWatcher, RoundPhase

log = logging.getLogger(__name__)


class ValidatorService:
    """Owns the threads around a Validator; the Validator owns the work."""

    def __init__(self, validator: Validator, config: ValidatorConfig, poll_s: float = 0.5):
        self.validator, self.config = validator, config
        self.schedule = config.rounds.schedule()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._merges = ThreadPoolExecutor(max_workers=1, thread_name_prefix="validator-merge")
        self._watcher = PhaseWatcher(validator.chain, self.schedule, self._on_phase, poll_s=poll_s)
        self.metrics_port: int | None = None

    def start(self) -> ValidatorService:
        c = self.config
        if c.threads > 0:
            torch.set_num_threads(c.threads)
        if c.metrics_port:
            self.metrics_port = self.validator.metrics.serve(c.host, c.metrics_port)
        for i in range(c.workers):
            thread = threading.Thread(target=self._work, args=(f"{self.validator.name}-w{i}",),
                                      name=f"validator-worker-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)
        self._watcher.start()
        log.info("validator %s: %d workers, metrics %s", self.validator.identity.hotkey, c.workers,
                 f"on :{self.metrics_port}" if self.metrics_port else "off")
        return self

    def _work(self, consumer: str) -> None:
        # Reclaiming scans the pending list: every half idle time is often enough to pick up a
        # dead worker's task soon after it becomes reclaimable.
        every_s = max(1.0, self.config.claim_idle_s / 2)
        next_reclaim = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                reclaim = now >= next_reclaim
                if reclaim:
                    next_reclaim = now + every_s
                self.validator.work_once(consumer, block_ms=1000, reclaim=reclaim)
            except Exception as e:  # Redis away: wait and try again, the tasks stay in the stream
                log.warning("%s: %s: %s", consumer, type(e).__name__, e)
                self._stop.wait(1.0)
        try:
            self.validator.queue.forget(consumer)
        except Exception as e:
            log.debug("could not remove consumer %s: %s", consumer, e)

    def _on_phase(self, now: RoundPhase) -> None:
        self.validator.metrics.on_phase(now)
        if now.phase == "reveal":
            # Probe the live services as soon as the miners reveal: the weights they serve keep
            # training, so the closer to the commitment, the less honest drift the gate must allow.
            reveal_s = now.blocks_left_in_phase * self.validator.chain.hyperparameters().block_s
            self._merges.submit(self._early_live, now.round, reveal_s)
        elif now.phase == "validate":
            self.validator.enqueue_round(now.round)
        elif now.phase == "merge":
            try:
                self.validator.enqueue_round(now.round)  # a second chance if the validate phase was missed
            except Exception as e:
                log.warning("round %d: could not enqueue: %s: %s", now.round, type(e).__name__, e)
            wait_s = now.blocks_left_in_phase * self.validator.chain.hyperparameters().block_s / 2
            self._merges.submit(self._merge, now.round, wait_s)

    def _early_live(self, round: int, reveal_s: float) -> None:
        try:
            self.validator.early_live_checks(round, wait_s=reveal_s * 0.6)
        except Exception as e:  # the validate phase checks whoever was not probed here
            log.warning("round %d: early live checks failed: %s: %s", round, type(e).__name__, e)

    def _merge(self, round: int, wait_s: float) -> None:
        try:
            self.validator.merge_round(round, wait_s=wait_s)
        except Exception:
            log.exception("merge of round %d failed", round)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop polling and taking tasks; wait up to `grace_s` for tasks and a merge in progress."""
        grace_s = self.config.grace_s if grace_s is None else grace_s
        self._watcher.stop()
        self._stop.set()
        deadline = time.monotonic() + grace_s
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._workers if t.is_alive()]
        if alive:  # their tasks stay pending and are reclaimed by another worker later
            log.warning("workers %s still busy after %.0f s; leaving their tasks to be reclaimed", alive, grace_s)
        self._merges.shutdown(wait=not alive, cancel_futures=True)
        self.validator.metrics.stop()
        self.validator.close()
