"""The `moe` command: train the LM, generate from a checkpoint, draw a run's plots.

    moe train --preset tiny --steps 500 --out runs/tiny
    moe train --preset small --minutes 10 --out runs/small
    moe train --out runs/small --resume runs/small --minutes 20   # continue (and extend) a run
    moe generate --ckpt runs/tiny --prompt "ROMEO:" --max-new-tokens 200
    moe plots --run runs/tiny
    moe classify-demo

Bad input (unknown preset, non-positive counts, a missing path, a directory that holds no
checkpoint) prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import random
import sys
from contextlib import contextmanager
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """Input the user can fix; printed as one line, exit status 2."""


@contextmanager
def _usage_errors():
    """ValueError from validation (presets, configs, paths) -> UsageError. Wraps only the steps
    before real work starts, so a bug during training still shows its traceback."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):            # one line instead of usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _number(parse, strict: bool, expected: str, bound: str):
    """An argparse type: `parse` the text, then require > 0 (strict) or >= 0, and finite."""
    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (value > 0 if strict else value >= 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return check


_positive_int = _number(int, True, "a positive integer", "a positive integer")
_nonnegative_int = _number(int, False, "an integer >= 0", ">= 0")
_positive_float = _number(float, True, "a positive number", "a positive number")
nonnegative_float_arg = _number(float, False, "a number >= 0", "a number >= 0")


def seed_arg(text: str) -> int:
    """An argparse type: an integer seed in [0, 2**32) (numpy and the data loader take no other)."""
    from moe.train.config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return value


def path_arg(text: str) -> str:
    """An argparse type: a path, not empty (an empty one would silently mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty; give a path")
    return text


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- moe train ------------------------------------------------------------------------------

# What `moe train` does when neither --steps nor --minutes is given.
DEFAULT_BUDGET = {"tiny": {"steps": 1000}, "small": {"minutes": 10.0}, "base": {"steps": 20000}}
_RESUME_IGNORES = ("preset", "batch_size", "lr", "eval_every", "seed", "vocab_size", "max_bytes_per_domain",
                   "warmup_steps", "grad_clip")


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_train(args):
    """Validate the arguments and build (model, corpus, corpus config, train config, checkpoint or None)."""
    from moe.config import LMConfig, preset
    from moe.data import CorpusConfig, build_corpus
    from moe.lm import MoELM
    from moe.train import PRESET_TRAIN_DEFAULTS, TrainConfig
    from moe.train.checkpoint import STATE_FILE, read_config, resolve_checkpoint
    from moe.train.metrics_log import METRICS_FILE

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory")
    if args.resume is None:
        if (out / METRICS_FILE).exists():
            raise UsageError(f"--out {str(out)!r} already holds a training run; "
                             f"continue it with --resume {out} or choose another --out")
        if args.preset is None:
            raise UsageError("--preset is required for a new run (tiny, small or base)")
        for path in args.data or ():
            if not Path(path).exists():
                raise UsageError(f"--data path {path!r} does not exist")
        defaults = PRESET_TRAIN_DEFAULTS[args.preset]
        budget = ({"steps": args.steps or 0, "minutes": args.minutes or 0.0}
                  if args.steps or args.minutes else {"steps": 0, "minutes": 0.0, **DEFAULT_BUDGET[args.preset]})
        train_cfg = TrainConfig(
            **budget,
            batch_size=args.batch_size or defaults["batch_size"],
            lr=args.lr or defaults["lr"],
            warmup_steps=args.warmup_steps if args.warmup_steps is not None else defaults["warmup_steps"],
            grad_clip=args.grad_clip if args.grad_clip is not None else TrainConfig.grad_clip,
            eval_every=args.eval_every or TrainConfig.eval_every,
            seed=args.seed if args.seed is not None else 0)
        corpus_kwargs = {"user_paths": tuple(args.data or ()), "cache_dir": args.cache_dir}
        if args.vocab_size is not None:
            corpus_kwargs["vocab_size"] = args.vocab_size
        if args.max_bytes_per_domain is not None:
            corpus_kwargs["max_bytes_per_domain"] = args.max_bytes_per_domain
        corpus_cfg = CorpusConfig(**corpus_kwargs)
        ckpt = None
    else:
        ckpt = resolve_checkpoint(args.resume)
        if not (ckpt / STATE_FILE).is_file():
            raise UsageError(f"{ckpt} has no {STATE_FILE}; it cannot be resumed")
        config = read_config(ckpt)
        if not config.get("corpus_config") or not config.get("train_config"):
            raise UsageError(f"{ckpt}/config.json lacks the corpus or training config needed to resume")
        if (out / METRICS_FILE).exists() and out.resolve() != ckpt.parent.parent.resolve():
            raise UsageError(f"--out {str(out)!r} already holds another training run")
        ignored = [f"--{name.replace('_', '-')}" for name in _RESUME_IGNORES
                   if getattr(args, name) not in (None, [], ())] + (["--data"] if args.data else [])
        if ignored:
            _say(f"note: {', '.join(ignored)} ignored with --resume: the run's settings come from the checkpoint")
        train_cfg = TrainConfig.from_dict(config["train_config"])
        if args.steps or args.minutes:          # a new budget replaces the old one
            train_cfg = train_cfg.with_(steps=args.steps or 0, minutes=args.minutes or 0.0)
        corpus_cfg = CorpusConfig.from_dict(config["corpus_config"])
        lm_cfg = LMConfig.from_dict(config["lm_config"])

    corpus = build_corpus(corpus_cfg, progress=_say)
    if ckpt is None:
        lm_cfg = preset(args.preset, vocab_size=corpus.vocab_size)
        _seed_everything(train_cfg.seed)
    elif lm_cfg.vocab_size != corpus.vocab_size:
        raise UsageError(f"the rebuilt corpus has vocab {corpus.vocab_size}, the checkpoint {lm_cfg.vocab_size}")
    return MoELM(lm_cfg), corpus, corpus_cfg, train_cfg, ckpt


def cmd_train(args) -> int:
    import torch

    from moe.plots import write_plots
    from moe.train.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    with _usage_errors():
        model, corpus, corpus_cfg, train_cfg, ckpt = _prepare_train(args)
        trainer = Trainer(model, corpus, train_cfg, args.out, corpus_config=corpus_cfg, progress=not args.quiet,
                          log=None if not args.quiet else (lambda msg: None))
        if ckpt is not None:
            trainer.restore(ckpt)
    try:
        row = trainer.train()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except FloatingPointError as e:
        _say(f"moe train: error: {e}")
        return 1
    plots = write_plots(args.out)
    print(f"step {row['step']}  val loss {row['val_loss']:.4f}  val bpb {row['val_bpb']:.3f}  "
          f"({row['elapsed_s']:.0f}s); checkpoint and metrics in {args.out}, plots in {plots[0].parent}")
    return 0


# ---- moe generate / plots / classify-demo -----------------------------------------------------

def cmd_generate(args) -> int:
    import torch

    from moe.train.checkpoint import load_lm, load_tokenizer

    with _usage_errors():
        model, _config = load_lm(args.ckpt)
        tokenizer = load_tokenizer(args.ckpt)
    ids = tokenizer.encode(args.prompt) or [tokenizer.eos_id]     # an empty prompt starts a new document
    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids], dtype=torch.long), args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, generator=generator)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def cmd_plots(args) -> int:
    from moe.plots import write_plots

    with _usage_errors():
        paths = write_plots(args.run)
    for path in paths:
        print(path)
    return 0


def cmd_classify_demo(args) -> int:
    try:
        from moe.classifier import format_report, specialization_demo
    except ImportError as e:
        raise UsageError(f"the classifier demo is not available: {e}") from None
    print(format_report(specialization_demo(steps=args.steps, seed=args.seed)))
    return 0


# ---- parser and entry point -------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from moe.config import PRESETS

    parser = _Parser(prog="moe", description="Mixture-of-Experts LM: train, generate, plot.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train the LM on the bundled corpus (and --data files)")
    t.add_argument("--preset", choices=sorted(PRESETS), help="model size (required unless --resume)")
    t.add_argument("--steps", type=_positive_int,
                   help="optimizer steps (the schedule's length); with neither --steps nor --minutes: "
                        "tiny 1000 steps, small 10 minutes, base 20000 steps")
    t.add_argument("--minutes", type=_positive_float,
                   help="training wall-clock budget (evaluations included, corpus building not); alone it sets "
                        "the schedule length from the measured speed, with --steps it only caps the run")
    t.add_argument("--data", nargs="+", metavar="PATH", type=path_arg,
                   help="extra .txt/.jsonl files or folders (domain 'user')")
    t.add_argument("--batch-size", type=_positive_int, help="sequences per step (default: per preset)")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate (default: per preset)")
    t.add_argument("--warmup-steps", type=_nonnegative_int, help="linear warmup steps (default: per preset)")
    t.add_argument("--grad-clip", type=nonnegative_float_arg, help="max global gradient norm, 0 = off (default 1.0)")
    t.add_argument("--eval-every", type=_positive_int, help="steps between evaluations and checkpoints (default 100)")
    t.add_argument("--seed", type=seed_arg, help="model init and batch order (default 0)")
    t.add_argument("--vocab-size", type=_positive_int, help="BPE vocabulary size (default 8192)")
    t.add_argument("--max-bytes-per-domain", type=_positive_int, help="cap on each domain's text (default 8 MB)")
    t.add_argument("--cache-dir", type=path_arg, default=".cache/moe-data",
                   help="tokenized corpus cache (default .cache/moe-data)")
    t.add_argument("--out", type=path_arg, required=True, help="run directory: metrics.jsonl, checkpoints/, plots/")
    t.add_argument("--resume", type=path_arg, metavar="DIR", help="continue from a run directory or checkpoint")
    t.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    g.add_argument("--ckpt", type=path_arg, required=True, help="run directory or checkpoint directory")
    g.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=200)
    g.add_argument("--temperature", type=nonnegative_float_arg, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=_positive_int, default=None, help="sample among the k likeliest tokens")
    g.add_argument("--seed", type=seed_arg, default=0)
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("plots", help="draw a run's plots into RUN/plots/")
    p.add_argument("--run", type=path_arg, required=True, help="run directory (holds metrics.jsonl)")
    p.set_defaults(func=cmd_plots)

    c = sub.add_parser("classify-demo", help="MoEClassifier on clustered data: do experts specialize?")
    c.add_argument("--steps", type=_positive_int, default=400)
    c.add_argument("--seed", type=seed_arg, default=0)
    c.set_defaults(func=cmd_classify_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from moe.train.checkpoint import CheckpointError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:              # --help, or a usage error already printed as one line
        return e.code
    try:
        return args.func(args)
    except (UsageError, CheckpointError) as e:
        _say(f"moe {args.command}: error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
