"""One miner, one round -> a ValidationResult (subnet/validation_results.py).

    evaluator = Evaluator(EvalSettings.from_config(config), store, clients)
    result = evaluator.evaluate(glob, corpus, submission, earlier_submissions, chain_uid=3)

Per round and global version a `Baseline` is computed once and shared by every miner: the
validation batches (seeded by the round, so every validator draws the same ones and nobody
can tune on them in advance), the global model's loss on them, the hidden states at the input
of each MoE layer (the probe) and the global experts' outputs on that probe. Per miner:

1. its reveal and checkpoints are verified (any failure: verified False, every number NaN);
2. loss with its experts in place of the global ones, on the same batches -> loss_delta,
   and the token share each of its experts gets from the gate -> active_ratio;
3. its experts' outputs on the probe vs the other experts of their layer -> diversity, and vs
   every earlier commitment of the same uids -> copy_of;
4. the probe through its live service must give the published weights' outputs (live_check).

Each worker thread evaluates on its own copy of the global model; the copy is restored to
the global experts after every miner.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe.data import BatchSampler, Corpus
from moe.experts import SwiGLU, parse_expert_uid
from services.validator.global_model import GlobalModel, set_experts
from services.validator.live_check import LiveThresholds, check_live
from services.validator.scoring import active_ratio, diversity, is_copy, loss_delta, output_cosine, token_shares
from services.validator.submissions import LoadedSubmission, Submission, load_submission
from subnet.expert_client import ExpertClientPool
from subnet.manifest import CheckpointVerificationError
from subnet.object_store import ObjectStore
from subnet.validation_results import ValidationResult

log = logging.getLogger(__name__)
SEED_SALT = "moe-validator/eval-batches/v1"  # changing it changes every validator's batches
_KEEP_ROUNDS = 3                             # baselines and loaded submissions kept in memory


def round_seed(round: int) -> int:
    """The seed of a round's validation batches and probe: the same in every validator."""
    return int.from_bytes(hashlib.sha256(f"{SEED_SALT}:{round}".encode()).digest()[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class EvalSettings:
    eval_batches: int
    eval_batch_size: int
    probe_tokens: int
    active_threshold: float
    copy_cosine: float
    live: LiveThresholds

    @classmethod
    def from_config(cls, c) -> EvalSettings:
        return cls(c.eval_batches, c.eval_batch_size, c.probe_tokens, c.active_threshold, c.copy_cosine,
                   LiveThresholds(c.verify_cosine, c.verify_max_abs, c.rpc_timeout_s))


@dataclass
class Baseline:
    """What every miner of one round is compared with (see the module docstring)."""

    version: int
    round: int
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    global_loss: float
    probes: dict[int, torch.Tensor]           # MoE block index -> (probe_tokens, dim)
    global_outputs: dict[str, torch.Tensor]   # uid -> (probe_tokens, dim)


@torch.no_grad()
def run_batches(model, batches) -> tuple[float, torch.Tensor]:
    """(mean cross-entropy, (moe layers, experts) assignment counts) of `model` on `batches`."""
    losses, counts = [], None
    for x, y in batches:
        model(x, y)
        losses.append(model.last_stats["ce_loss"])
        c = model.last_stats["expert_counts"].cpu()
        counts = c if counts is None else counts + c
    return sum(losses) / len(losses), counts


def expert_outputs(states: dict, probes: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{uid: expert output on its layer's probe} for {uid: SwiGLU state}."""
    out = {}
    with torch.no_grad():
        for uid, state in states.items():
            layer, _ = parse_expert_uid(uid)
            w1 = state["w1.weight"]
            module = SwiGLU(w1.shape[1], w1.shape[0])
            module.load_state_dict(state)
            out[uid] = module(probes[layer])
    return out


class Evaluator:
    """Computes ValidationResults; thread-safe (the workers share one)."""

    def __init__(self, settings: EvalSettings, store: ObjectStore, clients: ExpertClientPool):
        self.settings, self.store, self.clients = settings, store, clients
        self._lock = threading.Lock()
        self._baselines: dict[tuple[int, int, int], Baseline] = {}
        self._loaded: dict[tuple[int, str, str], LoadedSubmission | Exception] = {}
        self._local = threading.local()
        self._live: dict[tuple[int, str, str], tuple] = {}  # early verification gates, per submission

    # -- shared per round ---------------------------------------------------------------------

    def baseline(self, glob: GlobalModel, corpus: Corpus, round: int) -> Baseline:
        with self._lock:  # one thread computes it; glob.model is touched only under this lock
            key = (glob.version, round, id(glob.model))  # a round's model may carry that round's trunk
            if key not in self._baselines:
                self._baselines[key] = self._compute_baseline(glob, corpus, round)
                for old in sorted(self._baselines, key=lambda k: k[1])[:-_KEEP_ROUNDS]:
                    del self._baselines[old]
            return self._baselines[key]

    def _compute_baseline(self, glob: GlobalModel, corpus: Corpus, round: int) -> Baseline:
        s, model, cfg = self.settings, glob.model, glob.lm_cfg
        sampler = BatchSampler(corpus, "val", cfg.block_size, s.eval_batch_size, seed=round_seed(round))
        batches = [sampler.next()[:2] for _ in range(s.eval_batches)]
        captured: dict[int, torch.Tensor] = {}

        def capture(layer: int):
            def hook(_module, args) -> None:  # returns None: the layer's input is left as it is
                captured.setdefault(layer, args[0].detach().reshape(-1, cfg.dim).clone())
            return hook

        hooks = [model.blocks[layer].ffn.register_forward_pre_hook(capture(layer)) for layer in cfg.moe_layers()]
        try:
            global_loss, _ = run_batches(model, batches)
        finally:
            for h in hooks:
                h.remove()
        gen = torch.Generator().manual_seed(round_seed(round))
        probes = {}
        for layer, hidden in captured.items():  # the first batch's states, a seeded subset of its tokens
            take = torch.randperm(hidden.shape[0], generator=gen)[:s.probe_tokens].sort().values
            probes[layer] = hidden[take]
        return Baseline(glob.version, round, batches, global_loss, probes, expert_outputs(glob.experts, probes))

    def submission_states(self, sub: Submission, glob: GlobalModel) -> dict:
        """The verified expert states of a submission (cached per round); raises what loading raised."""
        return self._loaded_submission(sub, glob).states

    def _loaded_submission(self, sub: Submission, glob: GlobalModel) -> LoadedSubmission:
        key = (sub.round, sub.hotkey, sub.digest)
        with self._lock:
            found = self._loaded.get(key)
        if found is None:
            try:
                found = load_submission(self.store, sub, glob.lm_cfg)
            except CheckpointVerificationError as e:
                found = e
            with self._lock:
                self._loaded[key] = found
                rounds = sorted({k[0] for k in self._loaded})
                for k in [k for k in self._loaded if k[0] in rounds[:-_KEEP_ROUNDS]]:
                    del self._loaded[k]
        if isinstance(found, Exception):
            raise found
        return found

    def _model(self, glob: GlobalModel):
        # Keyed by the model object, not the version: a round's model may carry that round's trunk.
        if getattr(self._local, "source", None) is not glob.model:
            with self._lock:
                self._local.model = copy.deepcopy(glob.model)
            self._local.source = glob.model
        return self._local.model

    # -- one miner ------------------------------------------------------------------------------

    def evaluate(self, glob: GlobalModel, corpus: Corpus, sub: Submission, earlier: Sequence[Submission],
                 chain_uid: int = -1) -> ValidationResult:
        started = time.perf_counter()
        base = self.baseline(glob, corpus, sub.round)
        head = {"round": sub.round, "hotkey": sub.hotkey, "uid": chain_uid}
        try:
            states = self.submission_states(sub, glob)
        except CheckpointVerificationError as e:
            return ValidationResult(**head, verified=False, reason=f"checkpoint not verified: {e}",
                                    details={"global_version": glob.version})
        uids = sorted(states, key=parse_expert_uid)

        model = self._model(glob)
        set_experts(model, states)
        try:
            loss, counts = run_batches(model, base.batches)
        finally:
            set_experts(model, {uid: glob.experts[uid] for uid in uids})
        moe_layers = glob.lm_cfg.moe_layers()
        shares = {}
        for uid in uids:
            layer, index = parse_expert_uid(uid)
            shares[uid] = token_shares(counts[moe_layers.index(layer)])[index]

        outputs = expert_outputs(states, base.probes)
        similarities = {}
        for uid in uids:
            layer, index = parse_expert_uid(uid)
            similarities[uid] = [output_cosine(outputs[uid], base.global_outputs[f"{layer}.{j}"])
                                 for j in range(glob.lm_cfg.n_experts) if j != index]
        copy_of, copy_check = self._copied_from(sub, earlier, glob, base, outputs)

        with self._lock:
            early = self._live.get((sub.round, sub.hotkey, sub.digest))
        live_reason, live = early or self._check_live(sub, glob, uids, base, outputs)
        reasons = [r for r in (f"copy of {copy_of}" if copy_of else "", live_reason) if r]
        details = {"global_version": glob.version, "shares": shares,
                   "diversity": {uid: diversity([similarities[uid]]) for uid in uids}, "live": live,
                   "copy_check": copy_check,
                   "eval_tokens": sum(int(y.numel()) for _, y in base.batches),
                   "eval_s": round(time.perf_counter() - started, 3)}
        return ValidationResult(**head, experts=tuple(uids), verified=not live_reason, loss=loss,
                                global_loss=base.global_loss, loss_delta=loss_delta(base.global_loss, loss),
                                diversity=diversity([similarities[uid] for uid in uids]),
                                active_ratio=active_ratio(shares.values(), self.settings.active_threshold),
                                copy_of=copy_of, reason="; ".join(reasons), details=details)

    def _check_live(self, sub: Submission, glob: GlobalModel, uids: Sequence[str], base: Baseline,
                    outputs: dict[str, torch.Tensor]):
        endpoints = self._loaded_submission(sub, glob).endpoints
        return check_live({uid: endpoints.get(uid) for uid in uids}, self.clients, sub.hotkey,
                          {uid: base.probes[parse_expert_uid(uid)[0]] for uid in uids}, outputs, self.settings.live,
                          round=sub.round)

    def probe_live(self, glob: GlobalModel, base: Baseline, sub: Submission) -> None:
        """The verification gate for `sub`, now (early, right after its reveal); kept for its evaluation.
        A checkpoint that does not verify is left to the evaluation, which reports it."""
        try:
            states = self.submission_states(sub, glob)
        except CheckpointVerificationError:
            return
        uids = sorted(states, key=parse_expert_uid)
        outcome = self._check_live(sub, glob, uids, base, expert_outputs(states, base.probes))
        with self._lock:
            self._live[(sub.round, sub.hotkey, sub.digest)] = outcome
            for key in [k for k in self._live if k[0] < sub.round - _KEEP_ROUNDS]:
                del self._live[key]

    def _copied_from(self, sub: Submission, earlier: Sequence[Submission], glob: GlobalModel, base: Baseline,
                     outputs: dict[str, torch.Tensor]) -> tuple[str, dict]:
        """(the hotkey of the earliest commitment whose every shared expert computes the same
        function as this miner's (outputs on the probe), or ""; what was compared, for the record:
        the lowest cosine with the global experts and with each earlier commitment).

        Only what differs from the global model can be copied: two miners that both republish the
        global weights (nobody trained yet, or a lazy miner) are not copies of each other (the loss
        score already pays them nothing). Experts still within the copy threshold of the global ones
        (a round that trained little, as the first rounds do) would match any other such miner's on
        their outputs, so there the changes are compared instead: outputs minus the global experts'
        outputs. Miners that trained on their own tokens changed their experts differently; a copy
        changed them exactly as its source did; a republished global expert changed nothing (no
        direction to compare: never a copy). An expert that neither changed (a miner hosting every
        expert may be routed no tokens for some in a round) is left out of the comparison; one that
        only one of them changed differs. Before this, a copy of a round-0 checkpoint went
        unflagged and was paid its source's loss_delta."""
        own = {uid: output_cosine(outputs[uid], base.global_outputs[uid]) for uid in outputs}
        near_global = is_copy(own, self.settings.copy_cosine)
        record: dict = {"global": _lowest(own), "earlier": {},
                        "compared": "changes from the global experts" if near_global else "outputs"}
        for other in sorted(earlier, key=lambda s: s.order):
            if other.order >= sub.order or other.hotkey == sub.hotkey:
                continue
            try:
                theirs = self.submission_states(other, glob)
            except CheckpointVerificationError:
                continue  # an unverifiable checkpoint is nobody's original
            shared = sorted(set(theirs) & set(outputs))
            if not shared:
                continue
            their_out = expert_outputs({uid: theirs[uid] for uid in shared}, base.probes)
            if near_global:
                g = base.global_outputs
                cosines = {uid: _change_cosine(outputs[uid], their_out[uid], g[uid]) for uid in shared}
                # An expert neither miner changed (no tokens routed to it this round) says nothing
                # either way: the ones that changed decide. None changed by either: not a copy.
                cosines = {uid: c for uid, c in cosines.items() if not math.isnan(c)}
            else:
                cosines = {uid: output_cosine(outputs[uid], their_out[uid]) for uid in shared}
            record["earlier"][other.hotkey] = _lowest(cosines)
            if is_copy(cosines, self.settings.copy_cosine):
                return other.hotkey, record
        return "", record


# A change of the outputs smaller than this (relative to the global expert's outputs) is float
# rounding, not training: two lazy miners must not be copies of each other by their rounding.
_MIN_CHANGE = 1e-6


def _change_cosine(a: torch.Tensor, b: torch.Tensor, global_out: torch.Tensor) -> float:
    """Cosine of what two experts changed from the global expert (outputs minus its outputs); NaN
    when neither changed beyond rounding (nothing to compare), 0.0 when only one did (they differ)."""
    da, db = (a.double() - global_out.double()), (b.double() - global_out.double())
    floor = _MIN_CHANGE * float(global_out.double().norm())
    moved_a, moved_b = float(da.norm()) > floor, float(db.norm()) > floor
    if not (moved_a and moved_b):
        return 0.0 if moved_a or moved_b else math.nan
    return output_cosine(da, db)


def _lowest(cosines: dict[str, float]) -> float | None:
    """The lowest cosine (the expert least like the other's), rounded for the record; None if none
    can be compared."""
    finite = [c for c in cosines.values() if math.isfinite(c)]
    return round(min(finite), 6) if finite else None
