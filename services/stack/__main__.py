"""The local stack: embedded Redis, expert services and the router, as local processes.

    python -m services.stack demo     # train with remote experts, Generate once, summary, plots, stop
    python -m services.stack serve    # serve the demo's model until Ctrl-C
    python -m services.stack --env-table

`demo` writes a step-0 checkpoint of the whole model, gives the routed experts to the expert
services (dealt round robin) and the trunk to the router, trains through the network for
STACK_TRAIN_MINUTES, asks the router for one Generate, prints a summary and stops every
process (also on Ctrl-C). The experts save their weights on shutdown, so `serve` can
bring the same model back.

Every process has its own development wallet under `<STACK_RUN_DIR>/wallets` (unencrypted,
made by `subnet.identity.create_dev_wallet`), registered on the local chain (in the stack's
Redis; the router with stake, so it holds a validator permit): the experts accept the router
(allow-list and chain), the router accepts the stack's client hotkey, which signs Generate.
An embedded S3 server (SeaweedFS) holds the signed checkpoints every service publishes each
round (services/stack/subnet_layer.py); its data is a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

# The stack forks children (preexec_fn) while gRPC threads run; gRPC's fork handlers can
# deadlock there and the children exec at once, so they are turned off before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc  # noqa: E402

from subnet.envconfig import ConfigError, from_env, markdown_table

MARKER = ".stack-run"          # a run directory the stack made and may clear
# Set by Ctrl-C / SIGTERM. A terminal's Ctrl-C reaches every child too, so a child may be seen
# exiting before this process handles its own signal: that is a stop, not a crash.
_interrupted = False
EXPERTS_FINAL = "experts.safetensors"


def _note_signal(signum, frame) -> None:
    global _interrupted
    _interrupted = True


def _interrupt(signum, frame) -> None:
    _note_signal(signum, frame)
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def _prepare_run_dir(run: Path) -> None:
    if run.exists() and any(run.iterdir()):
        if not (run / MARKER).exists():
            raise RuntimeError(f"STACK_RUN_DIR={run} exists and was not made by the stack; choose another directory")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / MARKER).write_text("made by python -m services.stack\n")


class _Wallets:
    """The stack's development wallets: one per expert service, the router's, the client's."""

    def __init__(self, run: Path):
        from subnet.identity import create_dev_wallet, load_identity

        self.path = run / "wallets"
        self._create = create_dev_wallet
        self.router = load_identity(create_dev_wallet(self.path, "stack-router"))
        self.client = load_identity(create_dev_wallet(self.path, "stack-client"))

    def hotkey(self, name: str) -> str:
        from subnet.identity import load_identity

        return load_identity(self._create(self.path, name)).hotkey

    def env(self, name: str, allow: str) -> dict[str, str]:
        """WALLET_* of wallet `name` (made if missing) and the one hotkey it accepts calls from."""
        wallet = self._create(self.path, name)
        return {"WALLET_PATH": wallet.path, "WALLET_NAME": wallet.name, "WALLET_HOTKEY": wallet.hotkey,
                "AUTH_ALLOWLIST": allow}


def _start_experts(group, cfg, lm_cfg, redis_url: str, checkpoint: Path, run: Path, wallets: _Wallets,
                   subnet_env: dict[str, str]) -> list[str]:
    from services.stack.placement import deal_experts
    from services.stack.processes import wait_serving

    endpoints = []
    deals = deal_experts(lm_cfg.moe_layers(), lm_cfg.n_experts, len(cfg.ports))
    for s, (port, uids) in enumerate(zip(cfg.ports, deals)):
        env = {"EXPERT_UIDS": ",".join(uids), "EXPERT_DIM": str(lm_cfg.dim),
               "EXPERT_INTER_DIM": str(lm_cfg.moe_inter_dim), "EXPERT_PORT": str(port),
               "REDIS_URL": redis_url, "EXPERT_CHECKPOINT": str(checkpoint),
               "EXPERT_SAVE_PATH": str(run / f"experts-{s}.safetensors"),
               "EXPERT_THREADS": str(cfg.expert_threads), "EXPERT_METRICS_PORT": str(cfg.metrics_port(1 + s)),
               **wallets.env(f"stack-expert-{s}", allow=wallets.router.hotkey), "AUTH_CHAIN": "1", **subnet_env}
        group.start(f"expert-{s}", ["-m", "services.expert"], env)
        endpoints.append(f"127.0.0.1:{port}")
        _say(f"expert service {s} on 127.0.0.1:{port} hosts {len(uids)} experts ({uids[0]} ... {uids[-1]})")
    for s, endpoint in enumerate(endpoints):
        wait_serving(endpoint, group, timeout_s=120, what=f"expert service {s}")
    return endpoints


def _router_env(cfg, redis_url: str, wallets: _Wallets, subnet_env: dict[str, str]) -> dict[str, str]:
    return {"ROUTER_PORT": str(cfg.router_port), "REDIS_URL": redis_url, "ROUTER_THREADS": str(cfg.router_threads),
            "ROUTER_METRICS_PORT": str(cfg.metrics_port(0)), "ROUTER_WIRE_DTYPE": cfg.wire_dtype,
            "ROUTER_EXPERT_TIMEOUT_S": str(cfg.expert_timeout_s),
            **wallets.env("stack-router", allow=wallets.client.hotkey), **subnet_env}


def _generate(endpoint: str, prompt: str, max_new_tokens: int, wallets: _Wallets) -> tuple[str, int, float]:
    from subnet.auth import SigningChannel
    from subnet.wire.v1 import router_pb2, router_pb2_grpc

    pieces, masked = [], 0
    started = time.perf_counter()
    with grpc.insecure_channel(endpoint) as channel:
        stub = router_pb2_grpc.RouterStub(SigningChannel(channel, wallets.client, wallets.router.hotkey))
        request = router_pb2.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens, temperature=0.8,
                                             top_k=50, seed=1)
        for reply in stub.Generate(request, timeout=300):
            pieces.append(reply.text)
            masked += reply.masked_calls
    return "".join(pieces), masked, time.perf_counter() - started


def _merge_expert_files(run: Path, n_services: int) -> Path | None:
    """One file with every expert, from the files the services wrote when they stopped."""
    from safetensors.torch import save_file

    from subnet.expert_weights import FORMAT, load_expert_weights

    tensors = {}
    for s in range(n_services):
        path = run / f"experts-{s}.safetensors"
        if not path.exists():
            return None
        for uid, state in load_expert_weights(path).items():
            tensors.update({f"{uid}.{name}": t.contiguous() for name, t in state.items()})
    final = run / EXPERTS_FINAL
    save_file(tensors, str(final), metadata={"format": FORMAT})
    return final


def _summary(run: Path, text: str, masked_generate: int, gen_s: float, n_tokens: int) -> None:
    from moe.train.metrics_log import METRICS_FILE, read_metrics

    rows = read_metrics(run / METRICS_FILE)
    last = rows[-1]
    first = rows[0]
    masked_train = sum(r.get("masked_calls") or 0 for r in rows)
    tok_s = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    print("\n" + "=" * 72)
    print(f"sample ({n_tokens} tokens in {gen_s:.1f}s):\n{text}")
    print("-" * 72)
    print(f"steps {last['step']}, {last['tokens']:,} tokens, {last['elapsed_s']:.0f}s")
    print(f"val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f} nats/token, "
          f"val bpb {first['val_bpb']:.3f} -> {last['val_bpb']:.3f}")
    domains = [k[len('val_bpb_'):] for k in last if k.startswith("val_bpb_")]
    print("val bpb by domain: " + ", ".join(f"{d} {last['val_bpb_' + d]:.3f}" for d in domains))
    if tok_s:
        print(f"training throughput: {sum(tok_s) / len(tok_s):,.0f} tokens/s (mean over evaluation intervals)")
    print(f"masked expert calls: {masked_train} in training, {masked_generate} while generating")
    print("expert load per MoE layer (share of validation token assignments):")
    for layer, shares in enumerate(last.get("expert_load") or []):
        print(f"  layer {layer}: " + " ".join(f"{s:.2f}" for s in shares))
    print(f"plots: {run / 'plots'}   metrics: {run / METRICS_FILE}")
    print("-" * 72)


def _start_subnet(cfg, redis_url: str, wallets: _Wallets):
    """Embedded S3, the local chain, and every wallet registered on it (the router with stake)."""
    from services.stack.subnet_layer import ROUTER_STAKE, SubnetLayer

    subnet = SubnetLayer(redis_url, cfg.s3_port)
    subnet.start()
    _say(f"S3 (SeaweedFS) on {subnet.endpoint}; local chain in redis, {subnet.chain_config.block_s:g} s blocks, "
         f"{subnet.schedule.tempo_blocks}-block rounds")
    subnet.register("router", wallets.router.hotkey, stake=ROUTER_STAKE)
    for s in range(len(cfg.ports)):
        subnet.register(f"expert-{s}", wallets.hotkey(f"stack-expert-{s}"))
    subnet.register("client", wallets.client.hotkey)
    return subnet


def run_stack(mode: str, cfg) -> int:
    from moe.config import LMConfig
    from moe.data import CorpusConfig
    from moe.train import PRESET_TRAIN_DEFAULTS, TrainConfig
    from moe.train.checkpoint import read_config, resolve_checkpoint
    from services.router.train import prepare_initial_checkpoint
    from services.stack.processes import ProcessGroup, check_ports_free, wait_serving
    from subnet.dev.redis_server import RedisServer

    run = Path(cfg.run_dir)
    ports = {"redis": cfg.redis_port, "router": cfg.router_port, "s3": cfg.s3_port,
             **{f"expert {i}": p for i, p in enumerate(cfg.ports)},
             **{f"metrics {i}": cfg.metrics_port(i) for i in range(1 + len(cfg.ports)) if cfg.metrics_base_port}}
    check_ports_free(ports)
    if mode == "demo":
        _prepare_run_dir(run)
        defaults = PRESET_TRAIN_DEFAULTS[cfg.preset]
        train_cfg = TrainConfig(minutes=cfg.train_minutes, batch_size=defaults["batch_size"], lr=defaults["lr"],
                                warmup_steps=defaults["warmup_steps"], eval_every=50)
        _say("building the corpus and the initial model (the tokenizer is cached after the first run)")
        ckpt, experts_file, lm_cfg = prepare_initial_checkpoint(run / "init", cfg.preset, train_cfg, CorpusConfig(),
                                                                progress=lambda m: _say(m))
    else:
        experts_file = run / EXPERTS_FINAL
        if not experts_file.exists():
            raise RuntimeError(f"{experts_file} not found: run `make demo` first (it trains the model to serve)")
        ckpt = resolve_checkpoint(run)
        lm_cfg = LMConfig.from_dict(read_config(ckpt)["lm_config"])

    group = ProcessGroup(run / "logs")
    redis = RedisServer(port=cfg.redis_port)
    wallets = _Wallets(run)
    subnet = None
    try:
        redis.start()
        _say(f"redis on {redis.url}")
        subnet = _start_subnet(cfg, redis.url, wallets)
        subnet_env = subnet.env()
        _start_experts(group, cfg, lm_cfg, redis.url, experts_file, run, wallets, subnet_env)
        router_endpoint = f"127.0.0.1:{cfg.router_port}"
        if mode == "demo":
            _say(f"router: training {cfg.preset} with remote experts for {cfg.train_minutes:g} minutes")
            group.start("router", ["-m", "services.router", "train", "--init", str(ckpt), "--out", str(run),
                                   "--serve"], _router_env(cfg, redis.url, wallets, subnet_env), show_output=True)
            wait_serving(router_endpoint, group, timeout_s=cfg.train_minutes * 60 + 600, what="router")
            text, masked, gen_s = _generate(router_endpoint, cfg.prompt, cfg.max_new_tokens, wallets)
            _summary(run, cfg.prompt + text, masked, gen_s, cfg.max_new_tokens)
            for line in subnet.summary():
                print(line)
            subnet.write_history(run / "commitments.json")
            print(f"commitments: {run / 'commitments.json'}; chain: python -m subnet.chain status "
                  f"(CHAIN_REDIS_URL={redis.url}) while the stack runs")
            print("=" * 72)
        else:
            group.start("router", ["-m", "services.router", "serve"],
                        {**_router_env(cfg, redis.url, wallets, subnet_env), "ROUTER_CHECKPOINT": str(ckpt)})
            wait_serving(router_endpoint, group, timeout_s=300, what="router")
            _say(f"serving moe.v1.Router on {router_endpoint} (hotkey {wallets.router.hotkey}); metrics on "
                 f":{cfg.metrics_base_port or 'off'}; sign Generate with WALLET_PATH={wallets.path} "
                 f"WALLET_NAME=stack-client; Ctrl-C stops everything")
            while True:
                group.check_alive()
                time.sleep(1.0)
        return 0
    except KeyboardInterrupt:
        _say("interrupted; stopping every process")
        return 130
    finally:
        # From here on a signal only takes note: raising inside the clean-up would leave it half done.
        signal.signal(signal.SIGINT, _note_signal)
        signal.signal(signal.SIGTERM, _note_signal)
        group.stop()      # the experts publish once more on SIGTERM: S3 and Redis stop after them
        if subnet is not None:
            subnet.stop()
        redis.stop()
        if mode == "demo":
            merged = _merge_expert_files(run, len(cfg.ports))
            if merged:
                _say(f"expert weights saved to {merged}; `make serve` serves this model")
        _say("all processes stopped")


def main(argv: list[str] | None = None) -> int:
    from services.stack.config import StackConfig

    parser = argparse.ArgumentParser(prog="python -m services.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["demo", "serve"])
    parser.add_argument("--env-table", action="store_true", help="print the environment variables as markdown")
    args = parser.parse_args(argv)
    if args.env_table:
        print(markdown_table(StackConfig), end="")
        return 0
    if args.mode is None:
        parser.print_usage(sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return run_stack(args.mode, from_env(StackConfig))
    except (ConfigError, RuntimeError, ValueError, OSError) as e:
        if _interrupted:
            _say("interrupted; every process stopped")
            return 130
        print(f"[stack] error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
