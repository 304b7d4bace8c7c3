"""Bad input to the command lines and configuration: a one-line error that names what to fix and
exit status 2, never a traceback, and nothing acted on silently (an empty path, a seed numpy refuses
after minutes of corpus building, a stack setting that fails once the demo has trained)."""

from __future__ import annotations

import json

import pytest
import torch

from moe import MoELM, preset
from moe.cli import main as moe_main
from moe.config import LMConfig
from moe.train.checkpoint import CheckpointError, save_checkpoint
from moe.train.config import TrainConfig
from subnet.envconfig import ConfigError, from_env


def _checkpoint(tmp_path):
    """A real step-0 checkpoint of a tiny model (no tokenizer), and its directory."""
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=64, block_size=16)
    return save_checkpoint(tmp_path / "run", 0, MoELM(cfg), {"lm_config": cfg.to_dict()})


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_weights_that_are_not_safetensors_are_a_checkpoint_error(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"junk")
    assert moe_main(["generate", "--ckpt", str(ckpt)]) == 2
    assert "model.safetensors is not a readable safetensors file" in _error_line(capsys)


@pytest.mark.parametrize("config, message", [
    ([1, 2], "is not a moe-checkpoint/1 config"),
    ({"format": "moe-checkpoint/1", "lm_config": {"vocab_size": "abc"}},
     "lm_config.vocab_size must be an integer, got 'abc'"),
    ({"format": "moe-checkpoint/1", "lm_config": {"jitter": True}}, "lm_config.jitter must be a number, got True"),
])
def test_a_config_json_of_the_wrong_shape_or_types_names_the_field(tmp_path, capsys, config, message):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "config.json").write_text(json.dumps(config))
    assert moe_main(["generate", "--ckpt", str(ckpt)]) == 2
    assert message in _error_line(capsys)


def test_a_tokenizer_file_that_is_not_one_is_named(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "tokenizer.json").write_text("garbage")
    assert moe_main(["generate", "--ckpt", str(ckpt)]) == 2
    assert "tokenizer.json is not a tokenizer file" in _error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--ckpt", "x", "--seed", "99999999999999999999999"], "must be in [0, 2**32)"),
    (["train", "--preset", "tiny", "--out", "x", "--seed", "-1"], "must be in [0, 2**32)"),
    (["classify-demo", "--seed", "1e3"], "expected an integer"),
    (["train", "--preset", "tiny", "--out", ""], "--out: must not be empty"),
    (["generate", "--ckpt", " "], "--ckpt: must not be empty"),
    (["plots", "--run", ""], "--run: must not be empty"),
])
def test_seeds_out_of_range_and_empty_paths_are_usage_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert moe_main(argv) == 2
    assert message in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []   # nothing made in the current directory


def test_train_configs_check_types_and_the_seed_range():
    with pytest.raises(ValueError, match=r"train_config.steps must be an integer, got 'x'"):
        TrainConfig.from_dict({"steps": "x"})
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\), got 4294967296"):
        TrainConfig(steps=1, seed=2**32)
    with pytest.raises(ValueError, match=r"train_config must be an object of TrainConfig fields, got list"):
        TrainConfig.from_dict([])
    assert LMConfig.from_dict({"vocab_size": 64, "capacity_factor": 1}).capacity_factor == 1   # an int is a number


@pytest.mark.parametrize("argv", [["serve", "--wait-s", "nan"], ["serve", "--wait-s", "-1"],
                                  ["train", "--init", "", "--out", "o"], ["init", "--preset", "tiny", "--out", "o",
                                                                          "--seed", "-5"]])
def test_the_router_command_line_refuses_bad_numbers_and_empty_paths(argv, capsys, tmp_path, monkeypatch):
    from services.router.__main__ import main as router_main

    monkeypatch.chdir(tmp_path)   # a regression would run the command: not in the checkout

    with pytest.raises(SystemExit) as exit_:
        router_main(argv)
    assert exit_.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_dev_wallet_needs_a_path(tmp_path, monkeypatch, capsys):
    from subnet.identity import main as identity_main

    monkeypatch.chdir(tmp_path)
    assert identity_main(["dev-wallet", "--path", ""]) == 2
    assert "WALLET_PATH must not be empty" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("env, message", [
    ({"STACK_WIRE_DTYPE": "bogus"}, "STACK_WIRE_DTYPE='bogus': choose one of fp32, bf16, fp16, int8"),
    ({"STACK_EXPERT_THREADS": "-1"}, "STACK_EXPERT_THREADS=-1 must be >= 0 (0 = torch's default)"),
    ({"STACK_ROUTER_THREADS": "-2"}, "STACK_ROUTER_THREADS=-2 and STACK_EXPERT_THREADS=1 must be >= 0"),
    ({"STACK_PROMPT": ""}, "STACK_PROMPT is empty"),
    ({"STACK_RUN_DIR": ""}, "STACK_RUN_DIR is empty"),
])
def test_the_stack_refuses_at_once_what_its_services_would_refuse_minutes_later(env, message):
    from services.stack.config import StackConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_env(StackConfig, env)


@pytest.mark.parametrize("endpoint, ok", [("minio:9000", True), ("[::1]:9000", True), ("minio", True),
                                          ("127.0.0.1:99999", False), ("h:abc", False), ("[::1]:0", False)])
def test_s3_endpoint_ports_are_checked_and_the_variable_named(endpoint, ok):
    from subnet.object_store import S3Config

    if ok:
        assert S3Config(endpoint=endpoint).endpoint == endpoint
    else:
        with pytest.raises(ValueError, match=r"S3_ENDPOINT=.*: the port .* must be a number in 1\.\.65535"):
            S3Config(endpoint=endpoint)


def test_an_advertised_endpoint_is_checked_even_without_the_chain():
    from services.expert.config import ExpertConfig

    with pytest.raises(ValueError, match=r"EXPERT_ADVERTISE_ENDPOINT: endpoint must be 'host:port'"):
        ExpertConfig(uids=("0.0",), advertise_endpoint="not an endpoint")
    assert ExpertConfig(uids=("0.0",), advertise_endpoint="expert-0:50051").advertise_endpoint == "expert-0:50051"


def test_an_expert_checkpoint_that_is_a_directory_says_so(tmp_path):
    from subnet.expert_weights import CheckpointError as ExpertCheckpointError
    from subnet.expert_weights import load_expert_weights

    with pytest.raises(ExpertCheckpointError, match=r"is a directory; give the \.safetensors file in it"):
        load_expert_weights(tmp_path)


def test_the_scorer_plot_names_a_bad_line_and_skips_a_torn_last_one(tmp_path, capsys):
    from services.scorer.plot import main as plot_main

    history = tmp_path / "ema_history.jsonl"
    history.write_text('{"round": 1, "uid": 0, "hotkey": "abc", "ema": 0.5}\n{"round": "x", "hotkey": 5}\n')
    assert plot_main([str(tmp_path)]) == 2
    assert f"{history}:2 is not a row of the scorer's EMA history" in _error_line(capsys)
    # A scorer killed mid-write, then restarted: the torn line is ended before the next round's rows.
    from services.scorer.scoreboard import Scoreboard

    history.write_text('{"round": 1, "uid": 0, "hotkey": "abcdefghij", "ema": 0.5}\n{"round": 2, "ui')
    Scoreboard(tmp_path).append_history(3, {"abcdefghij": 0.75}, {"abcdefghij": 0})
    assert history.read_text().splitlines()[1:] == ['{"round": 2, "ui', '{"round": 3, "hotkey": "abcdefghij", '
                                                                         '"uid": 0, "ema": 0.75}']
    assert plot_main([str(tmp_path)]) == 0
    assert (tmp_path / "scores.png").stat().st_size > 0


def test_moe_plots_of_a_metrics_file_without_rows_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("[1]\n")
    assert moe_main(["plots", "--run", str(tmp_path)]) == 2
    assert "has no metrics.jsonl with rows" in _error_line(capsys)


def test_a_checkpoint_error_is_a_value_error():
    """What the CLIs catch: the router's main catches ValueError, `moe` catches CheckpointError."""
    assert issubclass(CheckpointError, ValueError)
