"""subnet.expert_weights: the weight-file format and deterministic initialization."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe.experts import SwiGLU
from subnet.expert_weights import (
    CheckpointError,
    experts_from_checkpoint,
    init_expert,
    load_expert_weights,
    save_expert_weights,
)

torch.set_num_threads(1)


def test_save_then_load_round_trips_with_the_documented_keys(tmp_path):
    torch.manual_seed(0)
    experts = {"0.0": SwiGLU(8, 16), "1.3": SwiGLU(8, 16)}
    path = tmp_path / "experts.safetensors"
    save_expert_weights(path, experts)
    assert sorted(load_file(str(path))) == ["0.0.w1.weight", "0.0.w2.weight", "0.0.w3.weight",
                                            "1.3.w1.weight", "1.3.w2.weight", "1.3.w3.weight"]
    loaded = experts_from_checkpoint(path, ["1.3"], dim=8, inter_dim=16)  # a subset is fine
    assert list(loaded) == ["1.3"]
    for name, p in experts["1.3"].named_parameters():
        assert torch.equal(loaded["1.3"].get_parameter(name), p)


def test_half_precision_files_load_as_float32(tmp_path):
    path = tmp_path / "bf16.safetensors"
    save_file({"0.0.w1.weight": torch.ones(16, 8, dtype=torch.bfloat16),
               "0.0.w3.weight": torch.ones(16, 8, dtype=torch.bfloat16),
               "0.0.w2.weight": torch.ones(8, 16, dtype=torch.bfloat16)}, str(path))
    assert load_expert_weights(path)["0.0"]["w2.weight"].dtype == torch.float32


def test_errors_name_the_problem(tmp_path):
    path = tmp_path / "e.safetensors"
    save_expert_weights(path, {"0.0": SwiGLU(8, 16)})
    with pytest.raises(CheckpointError, match="no weights for 0.1"):
        experts_from_checkpoint(path, ["0.0", "0.1"], 8, 16)
    with pytest.raises(CheckpointError, match=r"configured for dim=8, inter_dim=32"):
        experts_from_checkpoint(path, ["0.0"], 8, 32)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_expert_weights(tmp_path / "missing.safetensors")
    save_file({"0.0.w1.weight": torch.ones(16, 8)}, str(path))
    with pytest.raises(CheckpointError, match="lacks 0.0.w2.weight"):
        load_expert_weights(path)
    save_file({"something.else": torch.ones(1)}, str(path))
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_expert_weights(path)


def test_init_depends_only_on_seed_and_uid():
    a, b = init_expert("0.1", 8, 16, seed=7), init_expert("0.1", 8, 16, seed=7)
    for name, p in a.named_parameters():
        assert torch.equal(p, b.get_parameter(name))
    assert not torch.equal(a.w1.weight, init_expert("0.2", 8, 16, seed=7).w1.weight)
    assert not torch.equal(a.w1.weight, init_expert("0.1", 8, 16, seed=8).w1.weight)
    assert a.w1.weight.abs().max() <= 1 / 8 ** 0.5  # nn.Linear's bound 1/sqrt(fan_in)
