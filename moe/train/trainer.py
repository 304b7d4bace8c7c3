"""The training loop of an MoELM on a Corpus.

    trainer = Trainer(model, corpus, TrainConfig(steps=1000), "runs/tiny", corpus_config=corpus_cfg)
    trainer.train()                        # or trainer.restore("runs/tiny") first to resume

One step: tell every expert group the step id, forward (the model's loss already holds the
weighted load-balance and z losses), backward, clip by the global gradient norm of local
AND external (remote) expert gradients, AdamW on the local parameters, then let each
expert group apply its own step with the same learning rate and clip factor. A step whose
global norm is NaN or Inf is skipped everywhere: no local update, and every expert group
discards its gradients (`skip_external_step`). Every `eval_every` steps: per-domain
validation, a metrics row (`skipped_steps` counts those), a checkpoint.

The trainer does not build the model, the corpus or the plots: callers pass in what they
built (a model with remote experts, a corpus with user data) and draw plots afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from moe.data import BatchSampler
from moe.train.checkpoint import (
    CHECKPOINTS_DIR,
    load_train_state,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from moe.train.config import TrainConfig
from moe.train.evaluate import evaluate
from moe.train.metrics_log import METRICS_FILE, MetricsLog, read_metrics
from moe.train.rng import capture_rng_state, restore_rng_state
from moe.train.schedule import lr_at

CALIBRATION_STEPS = 10        # time-budgeted run: steps timed before the first horizon, and between re-estimates
_UNKNOWN_HORIZON = 10**12     # schedule horizon until calibration: warmup, then (nearly) the peak


class _Interval:
    """Sums over the training steps since the last evaluation (what one metrics row averages)."""

    def __init__(self, n_layers: int, n_experts: int):
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0
        self.loss = self.ce = self.aux = self.z = self.grad_norm = 0.0
        self.masked_calls = 0
        self.skipped_steps = 0   # steps whose gradient norm was not finite: not in grad_norm's mean
        self.counts = torch.zeros(n_layers, n_experts, dtype=torch.long)

    def add(self, loss: float, stats: dict, tokens: int, seconds: float, grad_norm: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.loss += loss
        self.ce += stats["ce_loss"]
        self.aux += stats["aux_loss"]
        self.z += stats["z_loss"]
        if math.isfinite(grad_norm):
            self.grad_norm += grad_norm
        else:
            self.skipped_steps += 1
        self.masked_calls += int(stats.get("masked_calls", 0))
        self.counts += stats["expert_counts"].cpu()

    def row(self) -> dict:
        """The interval's part of a metrics row; None where no step ran (the row at step 0)."""
        n = self.steps
        normed = n - self.skipped_steps
        totals = self.counts.sum(dim=1, keepdim=True).clamp_min(1)
        return {
            "train_loss": self.ce / n if n else None,              # cross-entropy, comparable with val_loss
            "train_total_loss": self.loss / n if n else None,      # what was minimized: ce + weighted aux + z
            "aux_loss": self.aux / n if n else None,
            "z_loss": self.z / n if n else None,
            "grad_norm": self.grad_norm / normed if normed else None,   # before clipping; finite ones
            "skipped_steps": self.skipped_steps,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
            "masked_calls": self.masked_calls,
            "train_expert_load": (self.counts.double() / totals).tolist() if n else None,
        }

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class Trainer:
    """Optimizes `model` on `corpus` as `cfg` says, writing metrics and checkpoints to `out_dir`."""

    def __init__(self, model, corpus, cfg: TrainConfig, out_dir, *, corpus_config=None,
                 progress: bool = True, log=None):
        if model.cfg.vocab_size != corpus.vocab_size:
            raise ValueError(f"model vocab_size {model.cfg.vocab_size} != corpus vocab_size {corpus.vocab_size}")
        self.model, self.corpus, self.cfg = model, corpus, cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.corpus_config = corpus_config          # saved so a resume rebuilds the same corpus
        self.progress = progress
        self._log = log if log is not None else (lambda msg: tqdm.write(msg, file=sys.stderr))
        self.optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
        block = model.cfg.block_size
        self.sampler = BatchSampler(corpus, "train", block, cfg.batch_size, cfg.seed)
        self.val_sampler = BatchSampler(corpus, "val", block, cfg.batch_size, cfg.seed)
        self.metrics = MetricsLog(self.out_dir / METRICS_FILE)
        self.n_moe_layers = len(model.cfg.moe_layers())
        self.device = next(model.parameters()).device     # batches follow the model
        self.step = 0                  # optimizer steps done
        self.tokens = 0                # training tokens consumed
        self.elapsed_s = 0.0           # wall time of the run so far, evaluations included, over resumes
        self.horizon = cfg.steps or None   # schedule length; estimated after calibration in a time-budgeted run
        self.last_eval_step = -1
        self.eval_s = 0.0              # duration of the last evaluation (for the horizon estimate)
        self.step_losses: list[float] = []   # loss of every step this Trainer ran (resume tests compare them)
        self.last_row: dict | None = None
        self._interval = _Interval(self.n_moe_layers, model.cfg.n_experts)
        self._step_times: list[float] = []
        self._last_grad_norm = 0.0
        self._clock0 = 0.0
        self._stop_requested = False

    # ---- schedule and budget ------------------------------------------------------------

    def lr_for(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(step, peak_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                     total_steps=self.horizon or _UNKNOWN_HORIZON, min_lr_ratio=cfg.min_lr_ratio)

    def _elapsed(self) -> float:
        return time.monotonic() - self._clock0

    def _finished(self, stop_at: int | None) -> bool:
        if stop_at is not None and self.step >= stop_at:
            return True
        if self.horizon is not None and self.step >= self.horizon:
            return True
        return bool(self.cfg.minutes) and self._elapsed() >= self.cfg.minutes * 60

    def _calibrate_horizon(self, sec_per_step: float) -> None:
        """Time-budgeted run: choose the step count that fits the remaining time, evaluations included.

        Called after the first few steps and again every few steps with the speed measured so far,
        so a machine that slows down (or speeds up) still ends its schedule near the budget."""
        remaining = self.cfg.minutes * 60 - self._elapsed() - self.eval_s   # the final evaluation
        per_step = sec_per_step + self.eval_s / self.cfg.eval_every
        first = self.horizon is None
        self.horizon = self.step + max(1, int(remaining / per_step))
        if first:
            self._log(f"time budget {self.cfg.minutes:g} min: {sec_per_step * 1000:.0f} ms/step -> "
                      f"schedule horizon {self.horizon} steps")

    # ---- one step -------------------------------------------------------------------------

    def _clip(self, groups) -> tuple[float, float | None]:
        """Global-norm clipping over local and external gradients; returns (norm, clip factor), the
        factor None when the norm is NaN or Inf: no factor makes such gradients usable (0 * Inf is NaN)."""
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        local_sq = float(torch.stack([g.detach().float().square().sum() for g in grads]).sum()) if grads else 0.0
        total_sq = local_sq + sum(float(g.external_grad_sq_norm()) for g in groups)
        norm = math.sqrt(total_sq) if total_sq >= 0 else math.nan   # NaN >= 0 is False too
        if not math.isfinite(norm):
            return norm, None
        clip = 1.0
        if self.cfg.grad_clip > 0:
            clip = min(1.0, self.cfg.grad_clip / (norm + 1e-6))
        if clip < 1.0:
            torch._foreach_mul_(grads, clip)
        return norm, clip

    def train_step(self) -> float:
        """Run optimizer step `self.step`; returns its loss."""
        groups = self.model.expert_groups()
        lr = self.lr_for(self.step)
        settings = self.cfg.optimizer_settings()
        for g in groups:
            g.begin_step(self.step)
            g.step_settings(lr, settings, self.cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y, _domains = self.sampler.next()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        _, loss = self.model(x, y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {self.step}; try a lower learning rate")
        loss.backward()
        norm, clip = self._clip(groups)
        if clip is None:
            self._log(f"step {self.step}: gradient norm is {norm}; the update is skipped (trunk and experts)")
            for g in groups:
                g.skip_external_step()
        else:
            self.optimizer.step()
            for g in groups:
                g.apply_external_step(lr, clip, settings)
        self._last_grad_norm = norm
        return value

    # ---- the loop -------------------------------------------------------------------------

    def train(self, stop_at: int | None = None) -> dict:
        """Train until the step count or time budget is reached (or step `stop_at`, an
        interruption on purpose); evaluates, checkpoints and returns the last metrics row.
        A stop request (Ctrl-C, `request_stop`) saves a checkpoint and raises KeyboardInterrupt."""
        self.model.train()
        self._clock0 = time.monotonic() - self.elapsed_s
        self._step_times = []
        if self.last_eval_step < 0:
            self._log(f"training {self.model.num_params():,} parameters on {self.cfg.batch_size} x "
                      f"{self.model.cfg.block_size} tokens per step, domains {list(self.corpus.domains)}")
            self._evaluate_and_save()
        bar = tqdm(total=self.horizon, initial=self.step, unit="step", disable=not self.progress,
                   dynamic_ncols=True, file=sys.stderr)
        self._stop_requested = False
        with self._ctrl_c_stops_cleanly():
            return self._loop(bar, stop_at)

    def _loop(self, bar, stop_at: int | None) -> dict:
        try:
            while not self._finished(stop_at) and not self._stop_requested:
                t0 = time.perf_counter()
                loss = self.train_step()
                dt = time.perf_counter() - t0
                tokens = self.cfg.batch_size * self.model.cfg.block_size
                self._interval.add(loss, self.model.last_stats, tokens, dt, self._last_grad_norm)
                self.step_losses.append(loss)
                self.step += 1
                self.tokens += tokens
                self.elapsed_s = self._elapsed()
                self._step_times.append(dt)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / dt:,.0f}", refresh=False)
                timed = len(self._step_times) > CALIBRATION_STEPS
                evaluate_now = self.step % self.cfg.eval_every == 0
                if evaluate_now:
                    self._evaluate_and_save()
                recalibrate = self.horizon is None or self.step % CALIBRATION_STEPS == 0 or evaluate_now
                if not self.cfg.steps and timed and recalibrate:
                    times = self._step_times[1:][-100:]          # recent speed; the first step pays one-off costs
                    self._calibrate_horizon(sum(times) / len(times))
                    bar.total = self.horizon
                    bar.refresh()
            if self._stop_requested:
                self.elapsed_s = self._elapsed()
                path = self.save_checkpoint()
                self._log(f"stopped at step {self.step}; checkpoint {path}")
                raise KeyboardInterrupt
            if self.last_eval_step != self.step:
                self._evaluate_and_save()
        finally:
            bar.close()
        return self.last_row

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and leave `train()` with KeyboardInterrupt.
        Safe to call from a signal handler (a service's SIGTERM drain does)."""
        self._stop_requested = True

    @contextmanager
    def _ctrl_c_stops_cleanly(self):
        """While training, the first Ctrl-C requests a stop between steps (so the checkpoint is
        exact); a second one interrupts at once. Only where Ctrl-C has its default meaning."""
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield
            return

        def on_sigint(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._log("stopping after this step (Ctrl-C again to abort without a checkpoint)")
            self.request_stop()

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _evaluate_and_save(self) -> dict:
        t0 = time.perf_counter()
        ev = evaluate(self.model, self.val_sampler, self.corpus, self.cfg.eval_batches)
        self.eval_s = time.perf_counter() - t0
        self.elapsed_s = self._elapsed()
        row = {"step": self.step, "tokens": self.tokens, "elapsed_s": round(self.elapsed_s, 3),
               "lr": self.lr_for(max(0, self.step - 1))}
        row.update(self._interval.row())
        row.update(ev)
        self.last_row = row
        self.last_eval_step = self.step
        self._interval = _Interval(self.n_moe_layers, self.model.cfg.n_experts)
        # The row goes first: a resume truncates rows past its checkpoint, so a crash between
        # the two writes cannot leave a checkpoint whose row is missing.
        self.metrics.append(row)
        if self.step > 0:
            self.save_checkpoint()
        train = f"train {row['train_loss']:.4f} | " if row["train_loss"] is not None else ""
        self._log(f"step {self.step:>6} | {train}val {row['val_loss']:.4f} | val bpb {row['val_bpb']:.3f} | "
                  f"aux {row['aux_loss'] or 0:.3f} | lr {row['lr']:.2e} | {row['elapsed_s']:.0f}s")
        return row

    # ---- checkpoints ----------------------------------------------------------------------

    def _config(self) -> dict:
        cc = self.corpus_config
        if cc is not None and dataclasses.is_dataclass(cc):
            cc = dataclasses.asdict(cc)
        return {"lm_config": self.model.cfg.to_dict(), "train_config": self.cfg.to_dict(), "corpus_config": cc,
                "domains": list(self.corpus.domains), "vocab_size": self.corpus.vocab_size,
                "eos_id": self.corpus.eos_id}

    def _train_state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s, "horizon": self.horizon,
                "last_eval_step": self.last_eval_step, "eval_s": self.eval_s,
                "steps": self.cfg.steps, "minutes": self.cfg.minutes,
                "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                "rng": capture_rng_state(), "interval": self._interval.state_dict()}

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.out_dir, self.step, self.model, self._config(), self._train_state(),
                               tokenizer_path=self.corpus.tokenizer_path, keep=self.cfg.keep_checkpoints)

    def restore(self, path) -> Path:
        """Continue from a checkpoint (or a run directory's latest): weights, optimizer, schedule
        position, sampler and RNG, so the run goes on exactly as if it had not stopped."""
        ckpt = resolve_checkpoint(path)
        state = load_train_state(ckpt)
        load_weights(self.model, ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"])
        self.step, self.tokens, self.elapsed_s = state["step"], state["tokens"], state["elapsed_s"]
        self.last_eval_step, self.eval_s = state["last_eval_step"], state["eval_s"]
        self._interval.load_state_dict(state["interval"])
        same_budget = (state["steps"], state["minutes"]) == (self.cfg.steps, self.cfg.minutes)
        self.horizon = state["horizon"] if same_budget else (self.cfg.steps or None)
        self._carry_metrics(ckpt)
        self._log(f"resumed from {ckpt} at step {self.step}")
        return ckpt

    def _carry_metrics(self, ckpt: Path) -> None:
        """Metrics rows up to the checkpoint's step: kept here, or copied from the source run."""
        if not self.metrics.path.exists() and ckpt.parent.name == CHECKPOINTS_DIR:
            source = ckpt.parent.parent / METRICS_FILE
            for row in read_metrics(source):
                if row.get("step", 0) <= self.step:
                    self.metrics.append(row)
        if self.metrics.path.exists():
            self.metrics.keep_until(self.step)
