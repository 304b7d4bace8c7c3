"""The local stack: embedded Redis, expert services and the router, as local processes.

    python -m services.stack demo     # train with remote experts, Generate once, summary, plots, stop
    python -m services.stack serve    # serve the demo's model until Ctrl-C
    python -m services.stack --env-table

`demo` writes a step-0 checkpoint of the whole model; starts the honest miners (expert services
that each host every routed expert: replicas), the adversarial test miners of STACK_ADVERSARIES,
a validator and a scorer; the router trains through the miners for STACK_TRAIN_MINUTES while
every round each miner and the router publish signed checkpoints and commit them, the validator
scores the miners and merges the best replicas into the next global version, and the scorer sets
weights on the chain. The stack prints each round's scoreboard, then one Generate, a summary, the
chain's weights and the global versions, and stops every process (also on Ctrl-C). The honest
miners save their weights on shutdown, so `serve` can bring the model back.

Every process has its own development wallet under `<STACK_RUN_DIR>/wallets` (unencrypted,
made by `subnet.identity.create_dev_wallet`), registered on the local chain (in the stack's
Redis; router, validator and scorer with stake, so they hold validator permits): the miners
accept the router (allow-list) and validators (chain), the router accepts the stack's client
hotkey, which signs Generate. Each miner publishes its endpoint on the local chain and the router
finds it there (STACK_DISCOVERY=chain, the default; `registry` for the Redis heartbeats). The miners
reach Redis as the ACL user `miner` (subnet/redis_acl.py: the registry, the nonces and the local
chain, not the validators' queue or the scores). An embedded
S3 server (SeaweedFS) holds the checkpoints (services/stack/subnet_layer.py); its data is a
temporary directory, removed at the end.
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


def _start_miners(group, cfg, lm_cfg, redis_url: str, checkpoint: Path, run: Path, wallets, subnet_env,
                  with_adversaries: bool) -> list:
    from services.stack.miners import miner_env, plan_miners
    from services.stack.processes import wait_serving

    miners = plan_miners(cfg.ports, cfg.adversaries if with_adversaries else ())
    for i, miner in enumerate(miners):
        env = miner_env(miner, i, cfg, lm_cfg, redis_url, checkpoint, run, wallets, subnet_env)
        group.start(miner.name, ["-m", "services.expert"], env)
        role = f"adversary ({miner.adversary})" if miner.adversary else "honest miner"
        _say(f"{miner.name} on {miner.endpoint}: {role}, hosts all {len(lm_cfg.moe_layers()) * lm_cfg.n_experts} "
             f"experts")
    for miner in miners:
        wait_serving(miner.endpoint, group, timeout_s=120, what=miner.name)
    return miners


def _router_env(cfg, redis_url: str, wallets, subnet_env: dict[str, str]) -> dict[str, str]:
    return {"ROUTER_PORT": str(cfg.router_port), "REDIS_URL": redis_url, "ROUTER_THREADS": str(cfg.router_threads),
            "ROUTER_METRICS_PORT": str(cfg.metrics_port(0)), "ROUTER_WIRE_DTYPE": cfg.wire_dtype,
            "ROUTER_EXPERT_TIMEOUT_S": str(cfg.expert_timeout_s),
            # Every miner is registered before the router starts: route to registered hotkeys only
            # (implied by ROUTER_DISCOVERY=chain, which lists registered neurons only).
            "ROUTER_DISCOVERY": cfg.discovery, "ROUTER_REGISTERED_EXPERTS_ONLY": "1",
            "ROUTER_DISCOVERY_PRIVATE": "1",   # the miners listen on 127.0.0.1
            **wallets.env("stack-router", allow=wallets.client.hotkey), **subnet_env}


def _start_judges(group, cfg, redis_url: str, run: Path, init_dir: Path, wallets, subnet_env, n_miners: int) -> None:
    """The validator (scores miners, merges) and the scorer (weights on the chain)."""
    wallet_env = {k: v for k, v in wallets.env("stack-validator").items() if k.startswith("WALLET_")}
    group.start("validator", ["-m", "services.validator"], {
        "REDIS_URL": redis_url, "VALIDATOR_INIT_CHECKPOINT": str(init_dir), "VALIDATOR_RUN_DIR": str(run / "validator"),
        "VALIDATOR_METRICS_PORT": str(cfg.metrics_port(1 + n_miners)), "VALIDATOR_THREADS": "1",
        # The live weights keep training between the commitment and the probe: a few steps of a small
        # model at the demo's learning rate move the outputs to cosine ~0.9. A liar's are ~0.
        "VALIDATOR_VERIFY_COSINE": os.environ.get("VALIDATOR_VERIFY_COSINE", "0.5"),
        "VALIDATOR_VERIFY_MAX_ABS": os.environ.get("VALIDATOR_VERIFY_MAX_ABS", "1.0"),
        # One-minute rounds of a small model: DiLoCo's extrapolating outer step (lr 0.7 with Nesterov
        # 0.9 moves 1.33x the first delta) overshoots the replicas here; the stack takes their
        # score-weighted average (outer lr 1, no momentum). Production rounds keep the defaults.
        "MERGE_OUTER_LR": os.environ.get("MERGE_OUTER_LR", "1.0"),
        "MERGE_MOMENTUM": os.environ.get("MERGE_MOMENTUM", "0.0"),
        **wallet_env, **subnet_env})
    wallet_env = {k: v for k, v in wallets.env("stack-scorer").items() if k.startswith("WALLET_")}
    group.start("scorer", ["-m", "services.scorer"], {
        "REDIS_URL": redis_url, "SCORER_RUN_DIR": str(run / "scorer"),
        # A minute of training moves the demo's experts by a few 1e-4 nats/token against the last merge.
        "SCORER_LOSS_SCALE": os.environ.get("SCORER_LOSS_SCALE", "0.002"),
        "SCORER_METRICS_PORT": str(cfg.metrics_port(2 + n_miners)), **wallet_env, **subnet_env})
    _say(f"validator and scorer started (logs in {run / 'logs'}); scoreboards appear after each round")


def _generate(endpoint: str, prompt: str, max_new_tokens: int, wallets) -> tuple[str, int, float]:
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


def _wait_for_router(endpoint: str, group, timeout_s: float, scoreboards) -> None:
    """Until the router serves (it trains first), printing each round's scoreboard as it appears."""
    from subnet import health

    deadline = time.monotonic() + timeout_s
    while True:
        group.check_alive()
        scoreboards.poll()
        try:
            health.wait_serving(endpoint, 2.0, check_alive=group.check_alive, what="router", poll_s=0.25)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router did not serve within {timeout_s:.0f} s") from None


def _final_experts(run: Path, miners) -> Path | None:
    """The first honest miner's saved weights (every honest miner hosts every expert)."""
    for miner in miners:
        path = run / f"{miner.name}.safetensors"
        if not miner.adversary and path.exists():
            final = run / EXPERTS_FINAL
            shutil.copyfile(path, final)
            return final
    return None


def _start_subnet(cfg, redis_url: str, wallets, miners_planned):
    """Embedded S3, the local chain, and every wallet registered on it (router, validator and
    scorer with stake: validator permits)."""
    from services.stack.subnet_layer import ROUTER_STAKE, SubnetLayer

    subnet = SubnetLayer(redis_url, cfg.s3_port)
    subnet.start()
    _say(f"S3 (SeaweedFS) on {subnet.endpoint}; local chain in redis, {subnet.chain_config.block_s:g} s blocks, "
         f"{subnet.schedule.tempo_blocks}-block rounds")
    subnet.register("router", wallets.router.hotkey, stake=ROUTER_STAKE)
    subnet.register("validator", wallets.identity("stack-validator").hotkey, stake=ROUTER_STAKE)
    subnet.register("scorer", wallets.identity("stack-scorer").hotkey, stake=ROUTER_STAKE)
    for miner in miners_planned:
        subnet.register(miner.name, wallets.identity(miner.wallet).hotkey)
    subnet.register("client", wallets.client.hotkey)
    return subnet


def stack_ports(cfg, planned: list, demo: bool) -> dict[str, int]:
    """Every port the mode's processes take, by process (0 = off); ValueError if two share one."""
    from services.stack.processes import check_ports_distinct

    # Metrics ports in the order cfg.metrics_port numbers them: router, miners, validator, scorer.
    metrics_users = ["router", *(m.name for m in planned), *(("validator", "scorer") if demo else ())]
    ports = {"redis": cfg.redis_port, "router": cfg.router_port, "s3": cfg.s3_port,
             **{m.name: m.port for m in planned},
             **{f"{who} metrics": cfg.metrics_port(i) for i, who in enumerate(metrics_users)}}
    check_ports_distinct(ports)
    return ports


def run_stack(mode: str, cfg) -> int:
    from moe.config import LMConfig
    from moe.data import CorpusConfig
    from moe.train import PRESET_TRAIN_DEFAULTS, TrainConfig
    from moe.train.checkpoint import read_config, resolve_checkpoint
    from services.router.train import prepare_initial_checkpoint
    from services.stack.miners import plan_miners
    from services.stack.processes import ProcessGroup, check_ports_free, wait_serving
    from services.stack.redis_users import stack_redis_users
    from services.stack.report import ScoreboardPrinter, chain_status, global_history, training_summary
    from services.stack.wallets import StackWallets
    from subnet.dev.redis_server import RedisServer
    from subnet.redis_acl import MINER_USER
    from subnet.redis_urls import redact

    run = Path(cfg.run_dir)
    demo = mode == "demo"
    planned = plan_miners(cfg.ports, cfg.adversaries if demo else ())
    check_ports_free(stack_ports(cfg, planned, demo))
    if demo:
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
    redis = RedisServer(port=cfg.redis_port, users=stack_redis_users())
    wallets = StackWallets(run)
    subnet, miners = None, planned
    try:
        redis.start()
        _say(f"redis on {redact(redis.url)}; the miners connect as the ACL user `{MINER_USER}` "
             f"(the registry, nonces and local chain only)")
        subnet = _start_subnet(cfg, redis.url, wallets, planned)
        subnet_env = subnet.env()
        miners = _start_miners(group, cfg, lm_cfg, redis.url_for(MINER_USER), experts_file, run, wallets,
                               subnet_env, demo)
        router_endpoint = f"127.0.0.1:{cfg.router_port}"
        if demo:
            _start_judges(group, cfg, redis.url, run, run / "init", wallets, subnet_env, len(miners))
            _say(f"router: training {cfg.preset} with remote experts for {cfg.train_minutes:g} minutes")
            group.start("router", ["-m", "services.router", "train", "--init", str(ckpt), "--out", str(run),
                                   "--serve"], _router_env(cfg, redis.url, wallets, subnet_env), show_output=True)
            scoreboards = ScoreboardPrinter(run / "scorer")
            _wait_for_router(router_endpoint, group, cfg.train_minutes * 60 + 600, scoreboards)
            text, masked, gen_s = _generate(router_endpoint, cfg.prompt, cfg.max_new_tokens, wallets)
            scoreboards.poll()
            training_summary(run, cfg.prompt + text, masked, gen_s, cfg.max_new_tokens)
            for line in subnet.summary():
                print(line)
            print("chain (local, in redis):\n" + chain_status(subnet.chain, subnet.schedule))
            print("global versions (merged by the validator):\n" + "\n".join(global_history(subnet.store)))
            _plot_scores(run)
            subnet.write_history(run / "commitments.json")
            subnet.write_report(run / "report.json", planned, run / "validator" / "merges.jsonl")
            print(f"commitments: {run / 'commitments.json'}; scoreboards: {run / 'scorer'}")
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
        group.stop()      # the miners publish once more on SIGTERM: S3 and Redis stop after them
        if subnet is not None:
            subnet.stop()
        redis.stop()
        if demo:
            final = _final_experts(run, miners)
            if final:
                _say(f"expert weights saved to {final}; `make serve` serves this model")
        _say("all processes stopped")


def _plot_scores(run: Path) -> None:
    history = run / "scorer" / "ema_history.jsonl"
    if not history.exists():
        print("scores.png: no scores yet (no round finished while training)")
        return
    from services.scorer.plot import plot_ema

    out = plot_ema(history, run / "scores.png")
    print(f"scores per miner over rounds: {out}")


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
