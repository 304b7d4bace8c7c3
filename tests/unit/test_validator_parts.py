"""The validator's configuration, entry point, submission parsing, global-model assembly and
momentum file, without any server."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save_model

from moe import MoELM
from moe.config import preset
from moe.experts import ROUTED_EXPERT_KEY
from services.validator.__main__ import main
from services.validator.config import ValidatorConfig
from services.validator.evaluation import round_seed
from services.validator.global_model import build_model, trunk_only
from services.validator.merge import MomentumStore
from services.validator.submissions import Submission, SubmissionError, manifests_of, round_submissions
from services.validator.task_queue import Task
from subnet.chain.base import Commitment
from subnet.chain.signing import digest_of
from subnet.checkpoint_loading import InvalidWeightsError
from subnet.envconfig import ConfigError, from_env

S3 = {"S3_ENDPOINT": "127.0.0.1:9"}


def test_config_defaults_and_clear_errors():
    c = from_env(ValidatorConfig, S3)
    assert (c.workers, c.merge_top_k, c.merge_outer_lr, c.merge_momentum) == (2, 2, 0.7, 0.9)
    assert (c.copy_cosine, c.verify_cosine, c.verify_max_abs, c.claim_idle_s) == (0.999, 0.99, 0.1, 30.0)
    with pytest.raises(ConfigError, match="S3_ENDPOINT is required"):
        from_env(ValidatorConfig, {})
    for var, value, message in [("VALIDATOR_WORKERS", "0", "VALIDATOR_WORKERS=0 must be positive"),
                                ("VALIDATOR_VERIFY_COSINE", "1.5", "must be in \\(0, 1\\]"),
                                ("MERGE_MOMENTUM", "1", "MERGE_MOMENTUM=1.0 must be in \\[0, 1\\)"),
                                ("VALIDATOR_ACTIVE_THRESHOLD", "nope", "is not a float"),
                                ("VALIDATOR_CLAIM_IDLE_S", "nan", "'nan' is not a finite number"),
                                ("VALIDATOR_LOG_LEVEL", "loud", "VALIDATOR_LOG_LEVEL='loud' is not a logging level"),
                                ("REDIS_URL", "localhost:6379", "REDIS_URL='localhost:6379' is not a Redis URL")]:
        with pytest.raises(ConfigError, match=message):
            from_env(ValidatorConfig, {**S3, var: value})


def test_main_prints_the_env_table_and_refuses_bad_config(capsys, monkeypatch):
    assert main(["--env-table"]) == 0
    table = capsys.readouterr().out
    for var in ("REDIS_URL", "VALIDATOR_WORKERS", "VALIDATOR_CLAIM_IDLE_S", "MERGE_OUTER_LR",
                "VALIDATOR_INIT_CHECKPOINT", "WALLET_PATH", "S3_ENDPOINT", "CHAIN_REDIS_URL", "ROUND_MERGE_BLOCKS"):
        assert f"`{var}`" in table
    monkeypatch.delenv("S3_ENDPOINT", raising=False)
    assert main([]) == 2 and "S3_ENDPOINT is required" in capsys.readouterr().err
    assert main(["--bogus"]) == 2


def test_round_seed_is_fixed_per_round():
    assert round_seed(7) == round_seed(7) != round_seed(8)


def _sub(hotkey: str, data: str, block: int = 3, digest: str | None = None) -> Submission:
    return Submission(hotkey, 1, digest or digest_of(data), block, data)


def test_round_submissions_split_miners_and_trunks_in_commit_order():
    trunk = json.dumps({"trunk": {"key": "checkpoints/trunk/1/manifest.json", "sha256": "ab"}})
    commitments = [Commitment("b", 1, digest_of("{}"), 5, revealed='{"0.1": "x"}'),
                   Commitment("a", 1, digest_of("{}"), 5, revealed='{"0.2": "y"}'),
                   Commitment("r", 1, digest_of(trunk), 2, revealed=trunk),
                   Commitment("z", 1, "00", 1, revealed=None)]   # never revealed: nothing to validate
    miners, trunks = round_submissions(commitments)
    assert [s.hotkey for s in miners] == ["a", "b"] and [s.hotkey for s in trunks] == ["r"]


def test_manifests_of_checks_digest_shape_and_uids():
    cfg = preset("tiny", vocab_size=300)   # MoE blocks 0 and 1, experts 0..3
    assert manifests_of(_sub("m", '{"0.1": "aa", "1.3": "bb"}'), cfg) == {"0.1": "aa", "1.3": "bb"}
    for data, message in [('{"0.1": "aa"}x', "not JSON"), ("[]", "non-empty"), ('{"0.9": "aa"}', "does not have"),
                          ('{"2.0": "aa"}', "does not have"), ('{"x": "aa"}', "<layer>.<index>")]:
        with pytest.raises(SubmissionError, match=message):
            manifests_of(_sub("m", data), cfg)
    with pytest.raises(SubmissionError, match="committed"):
        manifests_of(_sub("m", '{"0.1": "aa"}', digest="0" * 64), cfg)


def test_trunk_only_drops_routed_experts_and_build_model_restores_them(tmp_path):
    torch.manual_seed(0)
    model = MoELM(preset("tiny", vocab_size=300))
    save_model(model, str(tmp_path / "m.safetensors"))
    full = (tmp_path / "m.safetensors").read_bytes()
    trunk = trunk_only(full, "test")
    assert not any(ROUTED_EXPERT_KEY.match(k) for k in load(trunk)) and trunk_only(trunk, "test") == trunk
    experts = {f"{layer}.{i}": model.blocks[layer].ffn.experts[i].state_dict() for layer in (0, 1) for i in range(4)}
    rebuilt = build_model(model.cfg, trunk, experts, "test")
    for name, t in model.state_dict().items():   # the tied head is loaded through the embedding
        torch.testing.assert_close(rebuilt.state_dict()[name], t, rtol=0, atol=0, msg=name)
    with pytest.raises(InvalidWeightsError, match="missing or unknown"):
        build_model(model.cfg, trunk, {k: v for k, v in experts.items() if k != "1.3"}, "test")
    with pytest.raises(InvalidWeightsError, match="do not fit"):
        build_model(preset("tiny", vocab_size=300, dim=32, n_head=2), trunk, experts, "test")


def test_momentum_store_round_trip_and_unreadable_file(tmp_path):
    store = MomentumStore(tmp_path / "run")
    assert store.load() == {}
    momentum = {"0.1": {n: torch.randn(4, 3) for n in ("w1.weight", "w2.weight", "w3.weight")}}
    store.save(momentum)
    loaded = MomentumStore(tmp_path / "run").load()
    torch.testing.assert_close(loaded["0.1"]["w2.weight"], momentum["0.1"]["w2.weight"])
    store.path.write_bytes(b"not safetensors")
    assert store.load() == {}


def test_task_parse_reads_redis_fields():
    task = Task.parse(b"1-0", {b"round": b"4", b"hotkey": b"5Abc", b"global_version": b"2"})
    assert (task.entry_id, task.round, task.hotkey, task.global_version, task.deliveries) == ("1-0", 4, "5Abc", 2, 1)
