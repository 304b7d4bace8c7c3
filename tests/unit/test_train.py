"""Training: schedule, exact resume, learning, metrics, checkpoints, clipping across external experts."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from moe.boundary import ExpertGroup
from moe.config import preset
from moe.data import CorpusConfig, build_corpus
from moe.lm import MoELM
from moe.train import CheckpointError, TrainConfig, load_lm, lr_at, read_metrics, resolve_checkpoint
from moe.train.checkpoint import CHECKPOINTS_DIR, LATEST_FILE, save_checkpoint
from moe.train.trainer import Trainer

VOCAB = 512


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus_cfg(shared_cache_dir):
    return CorpusConfig(vocab_size=VOCAB, max_bytes_per_domain=300_000, cache_dir=shared_cache_dir)


@pytest.fixture(scope="module")
def corpus(corpus_cfg):
    return build_corpus(corpus_cfg)


def tiny_model(seed: int = 0, **overrides) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(preset("tiny", vocab_size=VOCAB, **overrides))


def make_trainer(corpus, out, cfg: TrainConfig, model=None, corpus_cfg=None) -> Trainer:
    return Trainer(model or tiny_model(), corpus, cfg, out, corpus_config=corpus_cfg, progress=False,
                   log=lambda msg: None)


# ---- schedule and config ------------------------------------------------------------------

def test_schedule_warmup_peak_cosine_and_floor():
    kw = {"peak_lr": 1e-3, "warmup_steps": 10, "total_steps": 110, "min_lr_ratio": 0.1}
    assert lr_at(0, **kw) == pytest.approx(1e-4)             # warmup starts above 0
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)             # last warmup step is the peak
    assert lr_at(10, **kw) == pytest.approx(1e-3)            # decay starts at the peak
    assert lr_at(60, **kw) == pytest.approx(0.55e-3)         # halfway: mean of peak and floor
    assert lr_at(110, **kw) == pytest.approx(1e-4)           # floor = 10% of peak
    assert lr_at(500, **kw) == pytest.approx(1e-4)           # and it stays there
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert lr_at(0, peak_lr=1.0, warmup_steps=0, total_steps=0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        lr_at(-1, **kw)
    with pytest.raises(ValueError):
        lr_at(0, peak_lr=0.0, warmup_steps=1, total_steps=2)


def test_train_config_validates_and_round_trips():
    cfg = TrainConfig(steps=10, lr=1e-3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.optimizer_settings().beta2 == cfg.beta2
    for bad in ({"steps": 0}, {"steps": -1, "minutes": 1}, {"steps": 5, "batch_size": 0},
                {"steps": 5, "lr": 0.0}, {"steps": 5, "min_lr_ratio": 1.5}, {"steps": 5, "eval_every": 0},
                {"steps": 5, "grad_clip": -1.0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"steps": 3, "bogus": 1})


# ---- resume ----------------------------------------------------------------------------------

def test_resume_continues_the_identical_loss_sequence(corpus, corpus_cfg, tmp_path):
    # Dropout and gate jitter make the step depend on torch's RNG, so the RNG restore is tested too.
    model_kw = {"dropout": 0.1, "jitter": 0.05}
    cfg = TrainConfig(steps=16, batch_size=8, lr=3e-3, warmup_steps=4, eval_every=5, eval_batches=1)

    straight = make_trainer(corpus, tmp_path / "straight", cfg, tiny_model(0, **model_kw))
    straight.train()

    # Piece 1 is stopped like Ctrl-C does it: between steps, without an evaluation.
    first = make_trainer(corpus, tmp_path / "split", cfg, tiny_model(0, **model_kw), corpus_cfg)
    run_step = first.train_step

    def step_then_stop():
        loss = run_step()
        if first.step == 5:                 # the step being run is step 5 -> stops with 6 done
            first.request_stop()
        return loss

    first.train_step = step_then_stop
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert first.step == 6 and resolve_checkpoint(tmp_path / "split").name == "step-00000006"

    # Pieces 2 and 3 start from other random inits: the weights must come from the checkpoints.
    pieces = [first]
    for seed, stop_at in ((123, 11), (456, None)):
        trainer = make_trainer(corpus, tmp_path / "split", cfg, tiny_model(seed, **model_kw), corpus_cfg)
        trainer.restore(tmp_path / "split")
        trainer.train(stop_at=stop_at)
        pieces.append(trainer)

    resumed = [loss for piece in pieces for loss in piece.step_losses]
    assert [len(p.step_losses) for p in pieces] == [6, 5, 5]
    assert max(abs(a - b) for a, b in zip(resumed, straight.step_losses, strict=True)) <= 1e-6
    for (name, a), b in zip(straight.model.state_dict().items(), pieces[-1].model.state_dict().values()):
        assert torch.equal(a, b), name
    # One metrics row per evaluation, none repeated; the interrupted piece left no row at step 6.
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [0, 5, 10, 11, 15, 16]
    last_split = read_metrics(tmp_path / "split" / "metrics.jsonl")[-1]
    last_straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")[-1]
    assert last_split["val_loss"] == pytest.approx(last_straight["val_loss"], abs=1e-6)


# ---- a real (short) training run shared by the next tests ------------------------------------

@pytest.fixture(scope="module")
def trained(corpus, corpus_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-run")
    cfg = TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=20, eval_every=75, eval_batches=4)
    trainer = make_trainer(corpus, out, cfg, tiny_model(0), corpus_cfg)
    trainer.train()
    return trainer


def test_tiny_preset_lowers_validation_loss(trained):
    rows = read_metrics(trained.out_dir / "metrics.jsonl")
    before, after = rows[0]["val_loss"], rows[-1]["val_loss"]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 150
    assert before == pytest.approx(math.log(VOCAB), abs=0.1)     # an untrained model is near uniform
    assert after < 0.8 * before and after < math.log(VOCAB)
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]


def test_metrics_rows_have_the_keys_and_consistent_bpb(trained, corpus):
    rows = read_metrics(trained.out_dir / "metrics.jsonl")
    n_layers, n_experts = len(trained.model.cfg.moe_layers()), trained.model.cfg.n_experts
    for row in rows[1:]:
        for key in ("step", "tokens", "elapsed_s", "train_loss", "val_loss", "val_bpb", "aux_loss", "z_loss",
                    "lr", "tokens_per_s", "expert_load", "expert_domain_share"):
            assert row[key] is not None, key
        bpbs = []
        for d in corpus.domains:
            expected = row[f"val_loss_{d}"] / math.log(2) / corpus.bytes_per_token("val", d)
            assert row[f"val_bpb_{d}"] == pytest.approx(expected, rel=1e-9)
            bpbs.append(row[f"val_bpb_{d}"])
        assert row["val_bpb"] == pytest.approx(sum(bpbs) / len(bpbs))
        assert row["val_loss"] == pytest.approx(sum(row[f"val_loss_{d}"] for d in corpus.domains) / 3)
        assert row["aux_loss"] >= 1.0 - 1e-6                    # E * sum f_i P_i >= 1, = 1 when balanced
        assert row["tokens"] == row["step"] * 32 * 64
        assert len(row["expert_load"]) == n_layers
        for layer in range(n_layers):
            assert len(row["expert_load"][layer]) == n_experts
            assert sum(row["expert_load"][layer]) == pytest.approx(1.0)
            assert set(row["expert_domain_share"][layer]) == set(corpus.domains)
            for share in row["expert_domain_share"][layer].values():
                assert sum(share) == pytest.approx(1.0)
    assert rows[0]["train_loss"] is None                          # nothing trained before step 0


def test_checkpoint_round_trip_gives_identical_logits(trained, corpus):
    model, config = load_lm(trained.out_dir)
    assert config["step"] == 150
    assert config["lm_config"] == trained.model.cfg.to_dict()
    assert TrainConfig.from_dict(config["train_config"]) == trained.cfg
    x = torch.tensor([corpus.encode("ROMEO: what light through yonder window breaks")[:32]])
    trained.model.eval()
    with torch.no_grad():
        expected, _ = trained.model(x)
        got, _ = model(x)
    assert torch.equal(got, expected)


def test_checkpoints_are_complete_pruned_and_resolved(trained, tmp_path):
    root = trained.out_dir / CHECKPOINTS_DIR
    names = sorted(p.name for p in root.iterdir())
    assert names == [LATEST_FILE, "step-00000075", "step-00000150"]    # keep_checkpoints=2, no temporaries
    assert (root / LATEST_FILE).read_text().strip() == "step-00000150"
    for name in names[1:]:
        assert {p.name for p in (root / name).iterdir()} == {"model.safetensors", "config.json",
                                                              "train_state.pt", "tokenizer.json"}
    assert resolve_checkpoint(trained.out_dir) == root / "step-00000150"
    assert resolve_checkpoint(root / "step-00000075") == root / "step-00000075"
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    model = tiny_model(0)
    first = save_checkpoint(tmp_path, 1, model, {"lm_config": model.cfg.to_dict()})
    with pytest.raises(FileNotFoundError):       # dies after weights and state are written
        save_checkpoint(tmp_path, 2, model, {"lm_config": model.cfg.to_dict()}, train_state={"step": 2},
                        tokenizer_path=tmp_path / "missing.json")
    assert resolve_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS_DIR).iterdir()) == [LATEST_FILE, "step-00000001"]


# ---- clipping and hooks for experts whose parameters live elsewhere ---------------------------

class SpyGroup(ExpertGroup):
    """Pretends to be a remote expert group holding gradients of squared norm `ext_sq`."""

    n_experts, dim = 4, 64

    def __init__(self, ext_sq: float):
        self.ext_sq, self.calls = ext_sq, []

    def run(self, batches, token_ids=None):
        raise AssertionError("not used")

    def begin_step(self, step):
        self.calls.append(("begin", step))

    def step_settings(self, lr, settings, grad_clip):
        self.calls.append(("settings", lr, settings, grad_clip))

    def external_grad_sq_norm(self):
        return self.ext_sq

    def apply_external_step(self, lr, grad_scale, settings):
        self.calls.append(("apply", lr, grad_scale, settings))


def test_clipping_includes_external_gradients_and_drives_the_hooks(corpus, tmp_path):
    model = tiny_model(0)
    spy = SpyGroup(ext_sq=100.0)                       # external norm 10 >> max norm 1
    model.expert_groups = lambda: [spy]
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=0, grad_clip=1.0, eval_every=10)
    trainer = make_trainer(corpus, tmp_path, cfg, model)
    trainer.train_step()
    local_sq = sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None)
    begin, before, apply = spy.calls
    assert begin == ("begin", 0)
    # The step's learning rate, AdamW settings and clip norm are known before backward (a group that
    # steps its experts during backward, remote asynchronous training, needs them then) ...
    assert before == ("settings", pytest.approx(trainer.lr_for(0)), cfg.optimizer_settings(), cfg.grad_clip)
    _, lr, clip, settings = apply
    assert lr == pytest.approx(trainer.lr_for(0))   # ... and again at the end, with the clip factor
    assert settings == cfg.optimizer_settings()
    # Local grads were scaled by `clip`; undo that to get the pre-clip total norm.
    total = math.sqrt(local_sq / clip ** 2 + 100.0)
    assert trainer._last_grad_norm == pytest.approx(total, rel=1e-5)
    assert clip == pytest.approx(1.0 / (total + 1e-6), rel=1e-6) and clip < 0.1


# ---- time budget -----------------------------------------------------------------------------

def test_time_budget_sets_a_horizon_and_stops(corpus, tmp_path):
    cfg = TrainConfig(minutes=0.08, batch_size=8, lr=1e-3, warmup_steps=2, eval_every=20, eval_batches=1)
    trainer = make_trainer(corpus, tmp_path, cfg)
    row = trainer.train()
    assert trainer.horizon is not None and trainer.step > 0
    assert row["step"] == trainer.step
    assert row["elapsed_s"] < 4.8 + 15.0                 # 4.8 s budget; slack for a busy machine
    assert trainer.lr_for(trainer.horizon) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
