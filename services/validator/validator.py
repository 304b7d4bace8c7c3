"""The validator's work, callable from tests, the stack and the service loop alike.

    validator = Validator(config, identity, chain, store, redis_client)
    validator.bootstrap()                     # global version 0 from VALIDATOR_INIT_CHECKPOINT if S3 has none
    results = validator.validate_round(7)     # enqueue every miner of round 7, work until all have results
    outcome = validator.merge_round(7)        # publish the next global version from round 7's best replicas

`validate_round` is synchronous: it enqueues the round's tasks and then takes tasks itself
until every miner of the round has a stored result, so it works with or without worker
threads running (services/validator/service.py runs those, and a PhaseWatcher that calls
`enqueue_round` in the validate phase and `merge_round` in the merge phase).

This class decides what to evaluate and stores results; the numbers come from
evaluation.Evaluator, the queue mechanics from task_queue.TaskQueue, the merge from merge.Merger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time

import redis

from moe.data import Corpus
from moe.train.checkpoint import WEIGHTS_FILE
from services.validator.config import ValidatorConfig
from services.validator.evaluation import EvalSettings, Evaluator, run_batches
from services.validator.global_model import (
    GlobalModel,
    bootstrap_global,
    build_model,
    read_global,
    validation_corpus,
)
from services.validator.merge import MergeOutcome, Merger
from services.validator.metrics import ValidatorMetrics
from services.validator.submissions import round_submissions
from services.validator.task_queue import Task, TaskQueue
from subnet.chain.base import Chain
from subnet.checkpoints import PublishError, latest_global_version
from subnet.expert_client import ExpertClientPool
from subnet.object_store import ObjectStore
from subnet.validation_results import ValidationResult

log = logging.getLogger(__name__)


class Validator:
    """Validation and merging for one validator hotkey. Thread-safe: worker threads share it."""

    def __init__(self, config: ValidatorConfig, identity, chain: Chain, store: ObjectStore, redis_client: redis.Redis,
                 *, metrics: ValidatorMetrics | None = None, clients: ExpertClientPool | None = None):
        self.config, self.identity, self.chain, self.store, self.redis = config, identity, chain, store, redis_client
        self.metrics = metrics or ValidatorMetrics()
        self.queue = TaskQueue(redis_client, config.key_prefix)
        self._own_clients = clients is None
        self.clients = clients or ExpertClientPool(identity=identity)
        self.evaluator = Evaluator(EvalSettings.from_config(config), store, self.clients)
        self.merger = Merger(store, identity, config.run_dir, config.merge_top_k, config.merge_outer_lr,
                             config.merge_momentum)
        self.scores_prefix = config.scores_prefix   # the scorer writes <prefix>round:<round>, hotkey -> score
        self.name = f"{identity.hotkey[:10]}-{os.getpid()}"
        self._lock = threading.Lock()
        self._globals: dict[int, GlobalModel] = {}
        self._round_models: dict[tuple[int, int], GlobalModel] = {}
        self._corpora: dict[str, Corpus] = {}
        self._merge_lock = threading.Lock()

    # -- the global model -------------------------------------------------------------------------

    def trusted_signers(self) -> set[str]:
        """Who may sign a global version: the chain's validators and this validator."""
        return set(self.chain.metagraph().validator_hotkeys) | {self.identity.hotkey}

    def bootstrap(self) -> GlobalModel:
        """Publish global version 0 from VALIDATOR_INIT_CHECKPOINT unless S3 holds a version; load the latest."""
        version = bootstrap_global(self.store, self.identity, self.config.init_checkpoint)
        glob = self.global_model()
        log.info("global version %d (latest is %d): %d experts, %s", glob.version, version, len(glob.experts),
                 self.store.where(f"checkpoints/global/{glob.version}"))
        return glob

    def trunk_signers(self) -> set[str]:
        """Whose revealed trunk may be evaluated against and merged: VALIDATOR_TRUNK_SIGNERS, else the
        hotkeys with a validator permit (the router holds stake)."""
        return set(self.config.trunk_signers) or set(self.chain.metagraph().validator_hotkeys)

    def global_model(self, version: int | None = None) -> GlobalModel:
        """The global model of `version` (None = the latest), verified and cached."""
        latest = version is None
        if latest:
            version = latest_global_version(self.store)  # only picks the cache entry; loading verifies
            if version is None:
                raise FileNotFoundError(f"{self.store.where()} holds no global version; run bootstrap() first")
        with self._lock:
            glob = self._globals.get(version)
        if glob is None:
            glob = read_global(self.store, self.trusted_signers(), version)
            with self._lock:
                self._globals[version] = glob
                for old in sorted(self._globals)[:-2]:  # the current version and the one before
                    del self._globals[old]
        if latest:
            self.metrics.global_version.set(glob.version)
        return glob

    def corpus(self, glob: GlobalModel) -> Corpus:
        key = json.dumps(glob.config.get("corpus_config"), sort_keys=True)
        with self._lock:
            if key not in self._corpora:
                self._corpora[key] = validation_corpus(glob.config, self.config.data_cache_dir)
            return self._corpora[key]

    # -- validation ---------------------------------------------------------------------------------

    def enqueue_round(self, round: int) -> list[str]:
        """Queue one task per miner that revealed for `round` (once, whoever calls); returns their hotkeys."""
        version = self.global_model().version
        miners, _ = round_submissions(self.chain.commitments(round))
        new = [s.hotkey for s in miners if self.queue.enqueue(round, s.hotkey, version)]
        log.info("round %d: %d miners revealed, %d tasks queued now (global version %d)", round, len(miners),
                 len(new), version)
        return [s.hotkey for s in miners]

    def process(self, task: Task, consumer: str) -> ValidationResult | None:
        """Evaluate one task and store its result; None if a result was already stored. A failure
        that is not the miner's (S3, chain) leaves the task pending for a retry, up to
        VALIDATOR_MAX_DELIVERIES; after that a failed result is stored."""
        if self.queue.has_result(task.round, task.hotkey):
            self.queue.ack(task)
            self.metrics.tasks.labels(result="duplicate").inc()
            return None
        started = time.perf_counter()
        try:
            with self.queue.holding(task, consumer, every_s=self.config.claim_idle_s / 3):
                result = self._evaluate(task)
        except Exception as e:
            self.metrics.tasks.labels(result="error").inc()
            if task.deliveries < self.config.max_deliveries:
                log.warning("round %d miner %s: attempt %d failed, will retry: %s: %s", task.round, task.hotkey,
                            task.deliveries, type(e).__name__, e)
                return None
            log.exception("round %d miner %s: giving up after %d attempts", task.round, task.hotkey, task.deliveries)
            result = ValidationResult(round=task.round, hotkey=task.hotkey, verified=False,
                                      reason=f"validator error after {task.deliveries} attempts: "
                                             f"{type(e).__name__}: {e}")
        stored = self.queue.complete(task, result)
        self.metrics.on_result(result, stored, time.perf_counter() - started)
        log.info("round %d miner %s: loss_delta %.4f diversity %.3f active %.2f%s%s", task.round, task.hotkey[:10],
                 result.loss_delta, result.diversity, result.active_ratio,
                 f" -- {result.reason}" if result.reason else "", "" if stored else " (already stored)")
        return result if stored else None

    def round_model(self, glob: GlobalModel, round: int) -> GlobalModel:
        """The global model as the miners of `round` trained against it: the global experts with the
        trunk the router revealed for that round (when a trusted one verifies), so a miner's experts
        and the global ones are compared under the trunk they were both meant for. Otherwise the
        global version itself. Cached per (version, round)."""
        key = (glob.version, round)
        with self._lock:
            cached = self._round_models.get(key)
        if cached is not None:
            return cached
        _, trunks = round_submissions(self.chain.commitments(round))
        files, signer = self.merger.round_trunk(glob, trunks, self.trunk_signers())
        if not signer:  # not revealed (yet): the global version itself, not cached so a later call can
            return glob  # still pick the round's trunk up
        model = dataclasses.replace(glob, files=files, model=build_model(
            glob.lm_cfg, files[WEIGHTS_FILE], glob.experts, f"round {round} trunk of {signer[:10]}"))
        log.info("round %d: evaluating against global version %d with the round's trunk", round, glob.version)
        with self._lock:
            self._round_models[key] = model
            for old in sorted(self._round_models)[:-2]:
                del self._round_models[old]
        return model

    def early_live_checks(self, round: int, wait_s: float = 0.0) -> int:
        """Probe the live service of every miner that has revealed `round` (waiting up to `wait_s`
        for reveals), keeping the outcome for its evaluation; returns how many were probed."""
        glob = self.round_model(self.global_model(), round)
        base = self.evaluator.baseline(glob, self.corpus(glob), round)
        deadline = time.monotonic() + wait_s
        done: set[str] = set()
        while True:
            miners, _ = round_submissions(self.chain.commitments(round))
            for sub in miners:
                if sub.hotkey not in done:
                    done.add(sub.hotkey)
                    self.evaluator.probe_live(glob, base, sub)
            if time.monotonic() >= deadline:
                return len(done)
            time.sleep(0.5)

    def _evaluate(self, task: Task) -> ValidationResult:
        glob = self.global_model(task.global_version if task.global_version >= 0 else None)
        glob = self.round_model(glob, task.round)
        miners, _ = round_submissions(self.chain.commitments(task.round))
        sub = next((s for s in miners if s.hotkey == task.hotkey), None)
        if sub is None:
            return ValidationResult(round=task.round, hotkey=task.hotkey, verified=False,
                                    reason="no revealed commitment for this round")
        neuron = self.chain.metagraph().by_hotkey(task.hotkey)
        earlier = [s for s in miners if s.order < sub.order]
        return self.evaluator.evaluate(glob, self.corpus(glob), sub, earlier, neuron.uid if neuron else -1)

    def work_once(self, consumer: str, block_ms: int = 1000, reclaim: bool = True) -> int:
        """Reclaim abandoned tasks (idle > VALIDATOR_CLAIM_IDLE_S), take new ones, process them all."""
        tasks = self.queue.reclaim(consumer, self.config.claim_idle_s) if reclaim else []
        if tasks:
            self.metrics.reclaims.inc(len(tasks))
            log.info("%s reclaimed %d abandoned tasks", consumer, len(tasks))
        tasks += self.queue.take(consumer, block_ms=block_ms)
        for task in tasks:
            self.process(task, consumer)
        return len(tasks)

    def validate_round(self, round: int, timeout_s: float = 600.0) -> dict[str, ValidationResult]:
        """Enqueue `round` and work until every miner of it has a result; {hotkey: result}."""
        hotkeys = self.enqueue_round(round)
        consumer = f"{self.name}-sync"
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                results = self.queue.results(round)
                if all(h in results for h in hotkeys):
                    return {h: results[h] for h in hotkeys}
                if time.monotonic() > deadline:
                    missing = [h for h in hotkeys if h not in results]
                    raise TimeoutError(f"round {round}: no result for {len(missing)} miners after {timeout_s:.0f} s")
                self.work_once(consumer, block_ms=200)
        finally:
            self.queue.forget(consumer)

    def wait_results(self, round: int, timeout_s: float) -> dict[str, ValidationResult]:
        """The round's results once every revealed miner has one, or whatever is there after `timeout_s`."""
        miners, _ = round_submissions(self.chain.commitments(round))
        deadline = time.monotonic() + timeout_s
        while True:
            results = self.queue.results(round)
            if all(s.hotkey in results for s in miners) or time.monotonic() >= deadline:
                return results
            time.sleep(0.2)

    # -- merge --------------------------------------------------------------------------------------

    def scores(self, round: int) -> dict[str, float] | None:
        """The scorer's scores of `round` (hotkey -> score), or None when it wrote none."""
        raw = self.redis.hgetall(f"{self.scores_prefix}round:{round}")
        out = {}
        for k, v in raw.items():
            try:
                out[k.decode() if isinstance(k, bytes) else k] = float(v)
            except ValueError:
                log.warning("ignoring malformed score %r of %r in round %d", v, k, round)
        return out or None

    def merge_round(self, round: int, wait_s: float = 0.0) -> MergeOutcome | None:
        """Publish the next global version from `round`'s results (waiting up to `wait_s` for them);
        None when the latest version already merged this round or later."""
        with self._merge_lock:
            glob = self.global_model()
            if glob.parent_version is not None and glob.round >= round:
                log.info("round %d: global version %d already merged round %d", round, glob.version, glob.round)
                self.metrics.merges.labels(result="skipped").inc()
                return None
            results = self.wait_results(round, wait_s)
            miners, trunks = round_submissions(self.chain.commitments(round))
            trusted = self.trunk_signers()
            try:
                outcome = self.merger.merge(glob, round, results, self.scores(round), {s.hotkey: s for s in miners},
                                            trunks, trusted, lambda s: self.evaluator.submission_states(s, glob))
            except PublishError as e:  # another validator merged this round first: its version stands
                log.warning("round %d: not published: %s", round, e)
                self.metrics.merges.labels(result="skipped").inc()
                return None
            except Exception:
                self.metrics.merges.labels(result="failed").inc()
                raise
            if outcome.published is None:
                log.info("round %d: no replica to merge and no new trunk; global version %d stays", round,
                         glob.version)
                self.metrics.merges.labels(result="unchanged").inc()
                return outcome
            self.metrics.merges.labels(result="published").inc()
            base = self.evaluator.baseline(glob, self.corpus(glob), round)
            merged_loss, _ = run_batches(outcome.model, base.batches)
            log.info("round %d: published global version %d (%d experts merged, trunk %s); validation loss "
                     "%.4f -> %.4f", round, glob.version + 1, len(outcome.merged), outcome.trunk_from or "kept",
                     base.global_loss, merged_loss)
            self._record_merge(round, glob.version + 1, base.global_loss, merged_loss, outcome,
                               {hotkey: r.loss for hotkey, r in results.items() if not r.zero})
            return outcome

    def _record_merge(self, round: int, version: int, global_loss: float, merged_loss: float, outcome,
                      replica_losses: dict[str, float]) -> None:
        """One line per published version in VALIDATOR_RUN_DIR/merges.jsonl: the merged model's loss on
        the round's validation batches, the very batches the round's miners were scored on."""
        if not self.config.run_dir:
            return
        row = {"round": round, "version": version, "global_loss": global_loss, "merged_loss": merged_loss,
               "merged": sorted(outcome.merged), "trunk_from": outcome.trunk_from,
               "replicas": sorted({hotkey for pairs in outcome.merged.values() for hotkey, _ in pairs}),
               "replica_losses": replica_losses}
        try:
            os.makedirs(self.config.run_dir, exist_ok=True)
            with open(os.path.join(self.config.run_dir, "merges.jsonl"), "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        except OSError as e:
            log.warning("could not record the merge of round %d: %s", round, e)

    def close(self) -> None:
        if self._own_clients:
            self.clients.close()
