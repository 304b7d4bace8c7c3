"""The router: trunk + gates of the LM, experts reached over gRPC.

    python -m services.router init  --preset small --out runs/demo/init [--minutes 5]
    python -m services.router train --init runs/demo/init --out runs/demo [--serve]
    ROUTER_CHECKPOINT=runs/demo python -m services.router serve
    python -m services.router --env-table

Configuration comes from the environment (see --env-table); the subcommand flags say
only what to do. Exit code 2 with one line on bad configuration or arguments.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import torch

from moe.cli import nonnegative_float_arg, path_arg, seed_arg
from subnet.allocator import reuse_freed_memory
from subnet.envconfig import ConfigError, from_env, markdown_table
from subnet.fd_limits import raise_fd_limit
from subnet.gc_pauses import freeze_startup_objects
from subnet.telemetry import setup_tracing, shutdown_tracing

log = logging.getLogger("services.router")


def _interrupt_on_sigterm() -> None:
    # Training saves a checkpoint on KeyboardInterrupt; SIGTERM (docker stop, kubectl) gets the same care.
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def _serve(model, tokenizer, parts, config, step: int) -> int:
    from services.router.http_api import HttpAccess, HttpApi
    from services.router.server import RouterServer, router_auth
    from services.router.servicer import RouterServicer

    servicer = RouterServicer(model, tokenizer, parts.replicas, parts.metrics, config.max_new_tokens, step=step,
                              max_batch=config.max_batch, max_queued=config.max_queued)
    server = RouterServer(servicer, config.host, config.port, config.max_message_mb,
                          auth=router_auth(config, parts.identity, parts.metrics))
    http = None
    if config.http_port:
        access = HttpAccess(token=config.http_token, open=not config.auth.enabled or config.open_generate)
        http = HttpApi(servicer.engine, config.host, config.http_port, access=access,
                       max_body_bytes=config.http_max_body_kb * 1024, timeout_s=config.http_timeout_s)
    freeze_startup_objects()   # the model and the libraries: full GC passes stop walking them
    server.start()
    hotkey = f" as {parts.identity.hotkey}" if parts.identity else ""
    print(f"router: serving moe.v1.Router on {server.endpoint}{hotkey} (auth {config.auth.mode})", flush=True)
    if http is not None:
        http.start()
        print(f"router: HTTP API on {http.url} (POST /v1/completions, GET /health, GET /model_info)", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        if http is not None:
            http.stop()
        server.stop()
        parts.close()
    return 0


def cmd_init(args, config) -> int:
    from moe.data import CorpusConfig
    from moe.train import PRESET_TRAIN_DEFAULTS, TrainConfig
    from services.router.train import prepare_initial_checkpoint

    defaults = PRESET_TRAIN_DEFAULTS[args.preset]
    train_cfg = TrainConfig(steps=args.steps or 0, minutes=args.minutes if not args.steps else 0.0,
                            batch_size=args.batch_size or defaults["batch_size"], lr=args.lr or defaults["lr"],
                            warmup_steps=defaults["warmup_steps"], eval_every=args.eval_every, seed=args.seed)
    corpus_kwargs = {"cache_dir": args.cache_dir}
    if args.max_bytes_per_domain:
        corpus_kwargs["max_bytes_per_domain"] = args.max_bytes_per_domain
    if args.vocab_size:
        corpus_kwargs["vocab_size"] = args.vocab_size
    ckpt, experts, lm_cfg = prepare_initial_checkpoint(args.out, args.preset, train_cfg, CorpusConfig(**corpus_kwargs),
                                                       seed=args.seed, progress=print)
    print(f"router: initial checkpoint {ckpt}; expert weights {experts} "
          f"({len(lm_cfg.moe_layers()) * lm_cfg.n_experts} experts, dim {lm_cfg.dim}, inter {lm_cfg.moe_inter_dim})")
    return 0


def cmd_train(args, config) -> int:
    from moe.plots import write_plots
    from services.router.train import build_remote_trainer

    _interrupt_on_sigterm()
    trainer, parts, corpus = build_remote_trainer(args.init, args.out, config, wait_s=args.wait_s,
                                                  progress=not args.quiet)
    rounds = None
    if config.s3.enabled:
        from services.router.rounds import RouterRounds

        rounds = RouterRounds(config, parts.identity, parts.metrics)
        rounds.start(trainer.enable_snapshots(), trainer.model.cfg.to_dict())
    freeze_startup_objects()
    try:
        row = trainer.train()
    except KeyboardInterrupt:
        if rounds is not None:
            rounds.stop()
        parts.close()
        return 130
    write_plots(args.out)
    print(f"router: trained to step {row['step']}: val loss {row['val_loss']:.4f}, val bpb {row['val_bpb']:.3f}, "
          f"{row.get('tokens_per_s') or 0:,.0f} tok/s", flush=True)
    if not args.serve:
        if rounds is not None:
            rounds.stop()
        parts.close()
        return 0
    try:  # serving goes on publishing the (now fixed) trunk each round
        return _serve(trainer.model, corpus, parts, config, step=trainer.step)
    finally:
        if rounds is not None:
            rounds.stop()


def cmd_serve(args, config) -> int:
    from moe.config import LMConfig
    from moe.train.checkpoint import load_tokenizer, read_config, resolve_checkpoint
    from services.router.remote_model import RemoteParts, build_remote_lm, load_trunk, required_expert_uids
    from services.router.train import wait_for_experts

    if not config.checkpoint:
        raise ConfigError("ROUTER_CHECKPOINT is required by `serve`: a run or checkpoint directory from training")
    _interrupt_on_sigterm()
    parts = RemoteParts.connect(config)
    source = config.checkpoint
    if source.startswith("s3://"):
        from services.router.rounds import fetch_trunk_checkpoint

        if not config.s3.enabled:
            raise ConfigError(f"ROUTER_CHECKPOINT={source} needs S3_ENDPOINT (and its keys)")
        source = fetch_trunk_checkpoint(config, parts.identity)
    ckpt = resolve_checkpoint(source)
    saved = read_config(ckpt)
    lm_cfg = LMConfig.from_dict(saved["lm_config"])
    wait_for_experts(parts, required_expert_uids(lm_cfg), args.wait_s)
    model = build_remote_lm(lm_cfg, parts, config)
    load_trunk(model, ckpt)
    return _serve(model, load_tokenizer(ckpt), parts, config, step=int(saved.get("step", 0)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.router", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-table", action="store_true", help="print the environment variables as markdown")
    sub = parser.add_subparsers(dest="command")
    i = sub.add_parser("init", help="write a step-0 checkpoint and the matching expert weight file")
    i.add_argument("--preset", choices=["tiny", "small", "base"], required=True)
    i.add_argument("--out", type=path_arg, required=True)
    i.add_argument("--minutes", type=float, default=5.0, help="training budget recorded for `train` (default 5)")
    i.add_argument("--steps", type=int, default=0, help="step budget instead of minutes")
    i.add_argument("--batch-size", type=int, default=0)
    i.add_argument("--lr", type=float, default=0.0)
    i.add_argument("--eval-every", type=int, default=100)
    i.add_argument("--seed", type=seed_arg, default=0)
    i.add_argument("--vocab-size", type=int, default=0)
    i.add_argument("--max-bytes-per-domain", type=int, default=0)
    i.add_argument("--cache-dir", type=path_arg, default=".cache/moe-data")
    t = sub.add_parser("train", help="train with remote experts from an `init` checkpoint")
    t.add_argument("--init", type=path_arg, required=True, help="checkpoint written by `init`")
    t.add_argument("--out", type=path_arg, required=True, help="run directory: metrics.jsonl, checkpoints/, plots/")
    t.add_argument("--serve", action="store_true", help="after training, serve moe.v1.Router with the model")
    t.add_argument("--wait-s", type=nonnegative_float_arg, default=60.0,
                   help="how long to wait for every expert to register")
    t.add_argument("--quiet", action="store_true")
    s = sub.add_parser("serve", help="serve moe.v1.Router from ROUTER_CHECKPOINT")
    s.add_argument("--wait-s", type=nonnegative_float_arg, default=60.0,
                   help="how long to wait for every expert to register")
    return parser


def main(argv: list[str] | None = None) -> int:
    from services.router.config import RouterConfig

    args = build_parser().parse_args(argv)
    if args.env_table:
        print(markdown_table(RouterConfig), end="")
        return 0
    if args.command is None:
        build_parser().print_usage(sys.stderr)
        return 2
    try:
        config = from_env(RouterConfig)
    except ConfigError as e:
        print(f"router: configuration error: {e}", file=sys.stderr)
        return 2
    reuse_freed_memory()   # before any thread: payload-sized buffers are reused, not faulted in afresh
    raise_fd_limit()       # one descriptor per connection: take the hard limit, not the 1024 default
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.threads:
        torch.set_num_threads(config.threads)
    # `init` calls no expert: nothing to trace.
    provider = setup_tracing(config.tracing, "router") if args.command != "init" else None
    try:
        return {"init": cmd_init, "train": cmd_train, "serve": cmd_serve}[args.command](args, config)
    except (ConfigError, ValueError, RuntimeError, OSError) as e:
        print(f"router: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_tracing(provider)  # the last spans, still queued for export


if __name__ == "__main__":
    sys.exit(main())
