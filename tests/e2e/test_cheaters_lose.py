"""End to end, every part real: `python -m services.stack demo` with the tiny preset runs an
embedded Redis (registry, streams, the local chain), SeaweedFS (checkpoints), two honest miners
that host every expert, the adversarial test miners lazy, noisy, copycat and liar, the router
training through them, a validator and a scorer, for several rounds. While it runs, this test
plays the replayer: it captures a signed request and re-sends it. Then it reads what the stack
wrote (report.json: the chain's weights and incentive; the scoreboards; the validator's merges).

Expected, as the incentive design says: the honest miners hold the highest weights; every
adversary ends with at most 5% of the total; no honest miner fails the live check; the liar and
the copycat score 0 from the round they are caught; replayed requests are refused; a merged
global model is not worse than the best honest replica it merged plus 1%.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from subnet.health import wait_serving
from subnet.identity import WalletConfig, load_identity
from subnet.processes import die_with_parent, port_in_use
from subnet.tensor_codec import encode
from subnet.wire.v1 import expert_pb2

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
ADVERSARIES = ("lazy", "noisy", "copycat", "liar")
TRAIN_MINUTES = 2.5


def _port_block(n: int) -> int:
    """The first of `n` consecutive free ports (the stack puts the adversaries after the honest miners),
    below Linux's ephemeral range (32768 and up): a port in it can become the local end of any
    outgoing connection before the service that should listen there starts (in CI a miner found
    its port taken that way)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - n)
        if not any(port_in_use(base + i) for i in range(n)):
            return base
    raise RuntimeError("no block of free ports between 20000 and 32000")


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("e2e") / "run"
    miners = _port_block(2 + len(ADVERSARIES) + 3)   # the miners, then Redis, the router and S3
    redis_port, router_port, s3_port = (miners + 2 + len(ADVERSARIES) + i for i in range(3))
    env = {**os.environ, "STACK_RUN_DIR": str(run), "STACK_PRESET": "tiny", "STACK_TRAIN_MINUTES": str(TRAIN_MINUTES),
           "STACK_ADVERSARIES": ",".join(ADVERSARIES), "STACK_EXPERT_PORTS": f"{miners},{miners + 1}",
           "STACK_REDIS_PORT": str(redis_port), "STACK_ROUTER_PORT": str(router_port),
           "STACK_S3_PORT": str(s3_port), "STACK_METRICS_BASE_PORT": "0", "STACK_MAX_NEW_TOKENS": "8",
           "CHAIN_BLOCK_S": "0.5", "PYTHONUNBUFFERED": "1", "GRPC_ENABLE_FORK_SUPPORT": "0"}
    log_path = run.parent / "stack.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.stack", "demo"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        replays = _replay_attack(run, f"127.0.0.1:{miners}", f"127.0.0.1:{miners + 1}", process, log_path)
        process.wait(timeout=TRAIN_MINUTES * 60 + 420)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)
    output = log_path.read_text(errors="replace")
    assert process.returncode == 0, output[-4000:]
    return run, replays, output


def _replay_attack(run: Path, victim: str, other: str, process, log_path) -> dict:
    """Sign one Forward as the router would (its wallet is in the run directory), send it, then
    replay the captured bytes and metadata to the same miner and to another one."""
    deadline = time.monotonic() + 240
    wallet = run / "wallets" / "stack-router"
    while not wallet.exists() or process.poll() is not None:
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "the stack made no router wallet"
        time.sleep(0.5)
    for endpoint in (victim, other):
        wait_serving(endpoint, max(1.0, deadline - time.monotonic()), what="miner")
    router = load_identity(WalletConfig(name="stack-router", hotkey="default", path=str(run / "wallets")))
    victim_hotkey = _hotkey_of(run, "stack-expert-0")
    import torch

    from moe.config import preset
    from subnet.auth.payload import sign_metadata

    body = expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(torch.randn(4, preset("tiny").dim)), call_id="",
                                     step=0, training=False).SerializeToString()
    method = "/moe.v1.Expert/Forward"
    metadata = sign_metadata(router, method, body, victim_hotkey)
    results = {}
    for name, endpoint in (("original", victim), ("replay", victim), ("misdirected", other)):
        with grpc.insecure_channel(endpoint) as channel:
            call = channel.unary_unary(method, request_serializer=lambda b: b,
                                       response_deserializer=expert_pb2.ForwardResponse.FromString)
            try:
                call(body, metadata=metadata, timeout=20)
                results[name] = "OK"
            except grpc.RpcError as e:
                results[name] = f"{e.code().name}: {e.details()}"
    return results


def _hotkey_of(run: Path, wallet: str) -> str:
    return load_identity(WalletConfig(name=wallet, hotkey="default", path=str(run / "wallets"))).hotkey


def _scoreboards(run: Path) -> dict[int, dict]:
    boards = {}
    for path in (run / "scorer").glob("scoreboard-*.json"):
        board = json.loads(path.read_text())
        boards[board["round"]] = {row["hotkey"]: row for row in board["rows"]}
    return dict(sorted(boards.items()))


def test_replayed_requests_are_refused(stack_run):
    _, replays, _ = stack_run
    assert replays["original"] == "OK", replays
    assert replays["replay"].startswith("UNAUTHENTICATED") and "replayed nonce" in replays["replay"], replays
    assert replays["misdirected"].startswith("UNAUTHENTICATED"), replays


def test_honest_miners_earn_and_cheaters_lose(stack_run):
    run, _, output = stack_run
    report = json.loads((run / "report.json").read_text())
    scorer_uid = str(next(m["uid"] for m in report["members"] if m["name"] == "scorer"))
    miners = {m["name"]: m for m in report["members"] if m["miner"]}
    weights = {name: m["weights"].get(scorer_uid, 0.0) for name, m in miners.items()}
    total = sum(weights.values())
    print("final weights:", json.dumps(weights, indent=1))
    print((run / "scorer" / "scoreboard.md").read_text())  # the last round's scoreboard, for the record
    assert total > 0, f"no weights were set:\n{output[-3000:]}"
    honest = {n: w for n, w in weights.items() if not miners[n]["adversary"]}
    cheats = {n: w for n, w in weights.items() if miners[n]["adversary"]}
    assert min(honest.values()) > max(cheats.values()), weights
    for name, w in cheats.items():
        assert w <= 0.05 * total, f"{name} holds {w / total:.1%} of the weight"

    boards = _scoreboards(run)
    # An honest miner trains on after its commitment; asked for its committed round, it answers
    # with exactly the weights it published (EXPERT_KEEP_COMMITTED), so the live check never flags it.
    for name in honest:
        flagged = {r: rows[miners[name]["hotkey"]]["reason"] for r, rows in boards.items()
                   if "does not serve the published weights" in (rows.get(miners[name]["hotkey"], {}).get("reason")
                                                                 or "")}
        assert not flagged, f"honest {name} failed the live check: {flagged}"
    for mode in ("liar", "copycat"):
        name = next(n for n in miners if miners[n]["adversary"] == mode)
        hotkey = miners[name]["hotkey"]
        caught = [r for r, rows in boards.items() if hotkey in rows and rows[hotkey]["reason"]]
        assert caught, f"{name} was never caught: {[rows.get(hotkey) for rows in boards.values()]}"
        for r, rows in boards.items():
            if r >= caught[0] and hotkey in rows:
                # None: no result that round (e.g. it committed nothing), which earns nothing either
                assert rows[hotkey]["score"] in (0.0, None), (name, r, rows[hotkey])
        assert weights[name] == 0.0


def test_a_merged_global_model_is_not_worse_than_its_best_honest_replica(stack_run):
    run, _, _ = stack_run
    report = json.loads((run / "report.json").read_text())
    honest = {m["hotkey"] for m in report["members"] if m["miner"] and not m["adversary"]}
    checked = 0
    for merge in report["merges"]:
        losses = [loss for hotkey, loss in merge["replica_losses"].items()
                  if hotkey in honest and hotkey in merge["replicas"]]
        if losses:
            checked += 1
            assert merge["merged_loss"] <= min(losses) * 1.01, merge
    assert checked, f"no merge used an honest replica: {report['merges']}"


def test_make_serve_serves_the_model_the_demo_trained(stack_run):
    """`make serve` (`python -m services.stack serve`) on the demo's run directory: two miners
    load the saved expert weights, publish their endpoints on the chain, and the router serves the
    latest trunk checkpoint. Its Logits equal the in-process model assembled from the same files,
    a signed Generate streams the tokens asked for, and Ctrl-C stops every process."""
    import signal

    import torch
    from safetensors.torch import load_model

    from moe.config import LMConfig
    from moe.experts import expert_uid
    from moe.lm import MoELM
    from moe.train.checkpoint import WEIGHTS_FILE, read_config, resolve_checkpoint
    from services.stack.wallets import StackWallets
    from subnet.auth import SigningChannel
    from subnet.expert_weights import load_expert_weights
    from subnet.tensor_codec import decode
    from subnet.wire.v1 import router_pb2, router_pb2_grpc

    run, _, _ = stack_run
    base = _port_block(5)   # two miners, Redis, the router, S3
    router = f"127.0.0.1:{base + 3}"
    env = {**os.environ, "STACK_RUN_DIR": str(run), "STACK_EXPERT_PORTS": f"{base},{base + 1}",
           "STACK_REDIS_PORT": str(base + 2), "STACK_ROUTER_PORT": str(base + 3), "STACK_S3_PORT": str(base + 4),
           "STACK_METRICS_BASE_PORT": "0", "STACK_WIRE_DTYPE": "fp32", "STACK_ADVERSARIES": "", "PYTHONUNBUFFERED": "1",
           "GRPC_ENABLE_FORK_SUPPORT": "0"}
    log_path = run.parent / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.stack", "serve"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 300
        while "serving moe.v1.Router" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "make serve did not come up in 300 s"
            time.sleep(0.5)

        # The model `make serve` should be serving, assembled in this process: the run's latest trunk
        # checkpoint (the router's part) and the experts the demo saved (what the miners load).
        ckpt = resolve_checkpoint(run)
        model = MoELM(LMConfig.from_dict(read_config(ckpt)["lm_config"])).eval()
        # load_model, not load_state_dict: the head shares its weight with the embedding (stored once).
        missing, unexpected = load_model(model, str(ckpt / WEIGHTS_FILE), strict=False)
        assert not unexpected and missing and all(".experts." in name for name in missing), missing
        experts = load_expert_weights(run / "experts.safetensors")
        for layer, block in enumerate(model.blocks):
            if block.is_moe:
                for i, module in enumerate(block.ffn.experts):
                    module.load_state_dict(experts[expert_uid(layer, i)])
        wallets = StackWallets(run)
        tokens = torch.randint(0, model.cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(3)).tolist()
        with grpc.insecure_channel(router) as channel:
            stub = router_pb2_grpc.RouterStub(SigningChannel(channel, wallets.client, wallets.router.hotkey))
            served = stub.Logits(router_pb2.LogitsRequest(tokens=tokens), timeout=120)
            replies = list(stub.Generate(router_pb2.GenerateRequest(prompt="The ", max_new_tokens=12, temperature=0.0),
                                         timeout=120))
        assert served.masked_calls == 0
        with torch.no_grad():
            expected = model(torch.tensor([tokens]))[0][0]
        torch.testing.assert_close(decode(served.logits), expected, rtol=1e-4, atol=1e-4)
        assert 1 <= len(replies) <= 12 and all(r.masked_calls == 0 for r in replies)

        process.send_signal(signal.SIGINT)
        process.wait(120)
        output = log_path.read_text(errors="replace")
        assert process.returncode == 130, output[-3000:]
        assert "all processes stopped" in output and "Traceback" not in output, output[-3000:]
        listening = [port for port in range(base, base + 5) if port_in_use(port)]
        assert not listening, f"ports {listening} still served after make serve stopped"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
