"""The `moe` command line: train -> resume -> generate -> plots, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moe.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(shared_cache_dir):
    return shared_cache_dir


def train_args(out, cache_dir, *extra):
    return ["train", "--preset", "tiny", "--vocab-size", "512", "--max-bytes-per-domain", "300000",
            "--cache-dir", cache_dir, "--batch-size", "8", "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def run_dir(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-run")
    assert main(train_args(out, cache_dir, "--steps", "30", "--eval-every", "15")) == 0
    return out


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(capsys, rc, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2
    assert len(lines) == 1 and "error" in lines[0], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_train_writes_metrics_checkpoint_and_plots(run_dir, capsys):
    assert [r["step"] for r in rows(run_dir)] == [0, 15, 30]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000030"
    for name in ("loss.png", "expert_load.png", "expert_domain.png"):
        data = (run_dir / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name


def test_resume_extends_the_run(run_dir, cache_dir, tmp_path):
    out = tmp_path / "continued"
    assert main(train_args(out, cache_dir, "--resume", str(run_dir), "--steps", "40")) == 0
    # The earlier rows come along, then the run goes on from step 30 to the new end.
    assert [r["step"] for r in rows(out)] == [0, 15, 30, 40]
    assert rows(out)[:3] == rows(run_dir)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000040"


def test_generate_prints_a_continuation(run_dir, capsys):
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "20",
                 "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.strip()) > len("ROMEO:")
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "20",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out == first                       # same seed, same text
    assert main(["generate", "--ckpt", str(run_dir / "checkpoints" / "step-00000015"), "--prompt", "",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0


def test_plots_command_redraws(run_dir, capsys):
    (run_dir / "plots" / "loss.png").unlink()
    capsys.readouterr()
    assert main(["plots", "--run", str(run_dir)]) == 0
    assert "loss.png" in capsys.readouterr().out
    assert (run_dir / "plots" / "loss.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--preset", "huge", "--out", "x"], "invalid choice"),
    (["train", "--preset", "tiny", "--steps", "0", "--out", "x"], "--steps"),
    (["train", "--preset", "tiny", "--steps", "-3", "--out", "x"], "--steps"),
    (["train", "--preset", "tiny", "--steps", "10"], "--out"),
    (["train", "--preset", "tiny", "--minutes", "abc", "--out", "x"], "--minutes"),
    (["generate", "--prompt", "hi"], "--ckpt"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2_with_one_line(argv, fragment, capsys):
    assert_one_line_error(capsys, main(argv), fragment)


def test_input_errors_exit_2_with_one_line(run_dir, cache_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert_one_line_error(capsys, main(train_args(out, cache_dir, "--steps", "5", "--resume", str(empty))),
                          "not a checkpoint")
    missing = str(tmp_path / "nope.txt")
    assert_one_line_error(capsys, main(train_args(out, cache_dir, "--steps", "5", "--data", missing)),
                          "does not exist")
    assert_one_line_error(capsys, main(train_args(run_dir, cache_dir, "--steps", "5")), "already holds")
    assert_one_line_error(capsys, main(["generate", "--ckpt", str(empty), "--prompt", "x"]), "not a checkpoint")
    assert_one_line_error(capsys, main(["plots", "--run", str(empty)]), "metrics.jsonl")
    assert not out.exists() or not (out / "metrics.jsonl").exists()


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moe.cli", "train", "--preset", "tiny", "--steps", "5",
                           "--resume", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not a checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_classify_demo_prints_its_report(capsys):
    assert main(["classify-demo", "--steps", "20"]) == 0
    assert "top-k share" in capsys.readouterr().out
