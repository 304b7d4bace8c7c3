"""EXPERT_SAVE_PATH: a service that stops writes the weights it trained, so the model survives restarts."""

import pytest
import torch

from moe.experts import SwiGLU
from subnet.expert_client import ExpertClientPool
from subnet.expert_weights import load_expert_weights, save_expert_weights
from subnet.tensor_codec import encode

pytestmark = pytest.mark.integration


def test_service_saves_trained_weights_on_sigterm(tmp_path, expert_service_factory, client_identity):
    torch.manual_seed(0)
    start = {"0.0": SwiGLU(16, 24), "0.1": SwiGLU(16, 24)}
    save_expert_weights(tmp_path / "start.safetensors", start)
    out = tmp_path / "saved.safetensors"
    handle = expert_service_factory(["0.0", "0.1"], 16, 24, env={
        "REDIS_URL": "", "EXPERT_CHECKPOINT": str(tmp_path / "start.safetensors"), "EXPERT_SAVE_PATH": str(out)})
    x = torch.randn(5, 16)
    with ExpertClientPool(identity=client_identity) as pool:
        client = pool.get(handle.endpoint, handle.hotkey)
        client.forward("0.0", encode(x), call_id="c1", step=0, training=True, timeout_s=30).result()
        client.backward("0.0", encode(torch.ones(5, 16)), call_id="c1", step=0, timeout_s=30).result()
        client.apply_step("0.0", step=0, lr=0.1, grad_scale=1.0, weight_decay=0.0, beta1=0.9, beta2=0.95,
                          eps=1e-8, timeout_s=30).result()
    assert handle.terminate() == 0
    saved = load_expert_weights(out)
    assert sorted(saved) == ["0.0", "0.1"]
    # Expert 0.0 took an optimizer step, 0.1 did not.
    assert not torch.allclose(saved["0.0"]["w2.weight"], start["0.0"].w2.weight)
    torch.testing.assert_close(saved["0.1"]["w2.weight"], start["0.1"].w2.weight)
