"""Remote experts are the same model: training through real expert services on loopback
equals in-process training, the router's Logits equal in-process logits, and training
survives a killed expert service."""

from __future__ import annotations

import dataclasses
import math
import time

import grpc
import pytest
import torch

from moe.data import CorpusConfig, build_corpus
from moe.train import TrainConfig
from moe.train.checkpoint import load_lm
from moe.train.trainer import Trainer
from services.router.config import RouterConfig
from services.router.server import RouterServer
from services.router.servicer import RouterServicer
from services.router.train import build_remote_trainer, prepare_initial_checkpoint
from services.stack.placement import deal_experts
from subnet.tensor_codec import decode
from subnet.wire.v1 import router_pb2, router_pb2_grpc
from tests.integration.counter_totals import counter_total

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory):
    cfg = CorpusConfig(vocab_size=512, max_bytes_per_domain=150_000, cache_dir=str(tmp_path_factory.mktemp("cache")))
    build_corpus(cfg)
    return cfg


def _init(tmp_path, corpus_cfg, steps=STEPS):
    train_cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=steps, eval_batches=2,
                            grad_clip=0.5)   # a low clip, so clipping (with remote grad norms) really happens
    ckpt, experts, lm_cfg = prepare_initial_checkpoint(tmp_path / "init", "tiny", train_cfg, corpus_cfg, seed=0)
    return ckpt, experts, lm_cfg, train_cfg


def _services(factory, redis_url, lm_cfg, experts, n_services=2):
    """Expert services that share the experts of every layer (index i -> service i % n)."""
    return [factory(uids, lm_cfg.dim, lm_cfg.moe_inter_dim,
                    env={"REDIS_URL": redis_url, "EXPERT_CHECKPOINT": str(experts)})
            for uids in deal_experts(lm_cfg.moe_layers(), lm_cfg.n_experts, n_services)]


def _private_db(redis_server, db: int) -> str:
    # Each test its own Redis database: the session's server also holds other tests' replicas.
    return redis_server.url.rsplit("/", 1)[0] + f"/{db}"


def _router_config(redis_url: str, wallet, timeout_s: float = 30.0) -> RouterConfig:
    """The router signs its expert calls with `wallet` (dev_wallets.router, allowed by every test expert)."""
    return RouterConfig(redis_url=redis_url, wire_dtype="fp32", expert_timeout_s=timeout_s, registry_refresh_s=0.5,
                        wallet=wallet)


def test_remote_training_equals_in_process(tmp_path, corpus_cfg, expert_service_factory, redis_server,
                                           dev_wallets):
    torch.set_num_threads(1)
    ckpt, experts, lm_cfg, train_cfg = _init(tmp_path, corpus_cfg)
    redis_url = _private_db(redis_server, 3)
    _services(expert_service_factory, redis_url, lm_cfg, experts)

    config = _router_config(redis_url, dev_wallets.router)
    remote, parts, corpus = build_remote_trainer(ckpt, tmp_path / "remote", config, progress=False)
    local_model, _ = load_lm(ckpt)
    local = Trainer(local_model, corpus, train_cfg, tmp_path / "local", progress=False)
    remote.train()
    local.train()

    assert len(remote.step_losses) == len(local.step_losses) == STEPS
    for step, (r, loc) in enumerate(zip(remote.step_losses, local.step_losses)):
        assert abs(r - loc) <= 1e-4 * abs(loc), f"step {step}: remote loss {r} vs in-process {loc}"
    assert local.step_losses[-1] < local.step_losses[0]         # it really trained
    assert remote.last_row["masked_calls"] == 0

    # Trunk parameters: compared directly.
    remote_state = remote.model.state_dict()
    for name, value in local_model.state_dict().items():
        if ".ffn.experts." in name:
            continue
        torch.testing.assert_close(remote_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # Expert parameters live in the services: compare what they compute on probe tokens.
    probe = torch.randn(16, lm_cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer, (r_moe, l_moe) in enumerate(zip(remote.model.moe_layers(), local_model.moe_layers())):
            batches = {i: probe for i in range(lm_cfg.n_experts)}
            got, want = r_moe.experts.run(batches), l_moe.experts.run(batches)
            for i in range(lm_cfg.n_experts):
                torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-5, msg=f"expert {layer}.{i}")

    # The router's Logits RPC answers with the in-process model's logits.
    servicer = RouterServicer(remote.model, corpus, parts.replicas, parts.metrics, max_new_tokens=16)
    server = RouterServer(servicer, "127.0.0.1", 0, max_message_mb=16).start()
    try:
        tokens = corpus.encode("ROMEO: what light through yonder window breaks")[:lm_cfg.block_size]
        with grpc.insecure_channel(server.endpoint) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            reply = stub.Logits(router_pb2.LogitsRequest(tokens=tokens), timeout=30)
            streamed = list(stub.Generate(router_pb2.GenerateRequest(prompt_tokens=tokens, max_new_tokens=5,
                                                                     temperature=0), timeout=30))
            with pytest.raises(grpc.RpcError) as bad:
                stub.Logits(router_pb2.LogitsRequest(tokens=[lm_cfg.vocab_size + 5]), timeout=30)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with torch.no_grad():
            want, _ = local_model.eval()(torch.tensor([tokens]))
        torch.testing.assert_close(decode(reply.logits), want[0], rtol=1e-4, atol=1e-4)
        greedy = local_model.generate(torch.tensor([tokens]), 5, temperature=0)[0, len(tokens):].tolist()
        assert [m.token for m in streamed] == greedy
    finally:
        server.stop(grace_s=1)
        parts.close()


def _rpc_calls(metrics, rpc: str) -> int:
    return int(counter_total(metrics.expert_calls, rpc=rpc, code="OK"))


def test_async_remote_training_steps_on_every_backward_and_learns(tmp_path, corpus_cfg, expert_service_factory,
                                                                 redis_server, dev_wallets):
    """ROUTER_TRAINING=async: each Backward applies its own AdamW step on the expert (hivemind style), no
    GradNorm or ApplyStep is sent, and the model still learns. It is not the in-process run any more
    (delayed, per-call-clipped expert updates), so only its first loss, before any update, equals it."""
    torch.set_num_threads(1)
    steps = 2 * STEPS
    ckpt, experts, lm_cfg, train_cfg = _init(tmp_path, corpus_cfg, steps=steps)
    redis_url = _private_db(redis_server, 5)
    services = _services(expert_service_factory, redis_url, lm_cfg, experts)

    config = dataclasses.replace(_router_config(redis_url, dev_wallets.router), training="async")
    remote, parts, corpus = build_remote_trainer(ckpt, tmp_path / "async", config, progress=False)
    local_model, _ = load_lm(ckpt)
    local = Trainer(local_model, corpus, train_cfg, tmp_path / "local", progress=False)
    try:
        local_first = local.train_step()
        remote.train()
        backwards = _rpc_calls(parts.metrics, "backward")
        assert _rpc_calls(parts.metrics, "gradnorm") == _rpc_calls(parts.metrics, "applystep") == 0
        assert backwards >= steps * len(lm_cfg.moe_layers())   # at least one expert per layer per step
        versions = sum(versions_of(service, parts) for service in services)
        assert versions == backwards   # one optimizer step per Backward, none lost, none twice
    finally:
        parts.close()
    assert len(remote.step_losses) == steps and remote.last_row["masked_calls"] == 0
    assert abs(remote.step_losses[0] - local_first) <= 1e-4 * local_first
    assert remote.step_losses[-1] < remote.step_losses[0] - 0.2, remote.step_losses   # it really trained


def versions_of(service, parts) -> int:
    """Optimizer steps the service applied, over all its experts (its own Info)."""
    info = parts.clients.get(service.endpoint, service.hotkey).info(timeout_s=10.0)
    return sum(int(e.version) for e in info.experts)


def test_training_survives_a_killed_expert_service(tmp_path, corpus_cfg, expert_service_factory, redis_server,
                                                   dev_wallets):
    torch.set_num_threads(1)
    ckpt, experts, lm_cfg, _ = _init(tmp_path, corpus_cfg, steps=100)
    redis_url = _private_db(redis_server, 4)
    survivor, victim = _services(expert_service_factory, redis_url, lm_cfg, experts)
    timeout_s = 3.0
    config = _router_config(redis_url, dev_wallets.router, timeout_s)
    trainer, parts, _ = build_remote_trainer(ckpt, tmp_path / "run", config, progress=False)
    trainer.model.train()
    for _ in range(2):
        trainer.train_step()
        trainer.step += 1
        assert trainer.model.last_stats["masked_calls"] == 0

    victim.kill()
    started = time.monotonic()
    loss = trainer.train_step()            # this step loses half of every layer's experts
    trainer.step += 1
    elapsed = time.monotonic() - started
    assert math.isfinite(loss)
    assert trainer.model.last_stats["masked_calls"] > 0
    # Forward, backward, grad norm and apply step each have one deadline; no call waits longer.
    assert elapsed < 4 * timeout_s + 5

    loss = trainer.train_step()            # training goes on without the dead service
    trainer.step += 1
    assert math.isfinite(loss)

    victim.restart()                       # it re-registers, and the router uses it again
    deadline = time.monotonic() + 30
    while True:
        parts.replicas.refresh()
        time.sleep(0.6)                    # past the 'suspect' cool-down of a failed endpoint
        trainer.train_step()
        trainer.step += 1
        if trainer.model.last_stats["masked_calls"] == 0:
            break
        assert time.monotonic() < deadline, "the restarted expert service was never used again"
    parts.close()
