"""The router's model behind its transports: one validation and one lock for gRPC and HTTP.

    engine = RouterEngine(model, tokenizer, replicas, metrics, max_new_tokens=512)
    idx = engine.prompt(text="ROMEO:")                                 # RequestError if unusable
    for token in engine.generate(idx, GenerateParams(max_new_tokens=20), deadline=...):
        send(token.text)

The model computes one token (or one Logits pass) at a time under a lock: its remote expert
groups keep per-call state, and on a CPU router parallel passes would only fight over the
same cores. The lock is held for one token's computation, never while a token is handed to
a client: a client that stops reading blocks only its own request, and concurrent requests
take turns token by token. A request whose deadline passes while it waits for the lock is
dropped before any computation (DeadlineExceeded); one that waits longer than `wait_s`
(HTTP's bound) gets Overloaded.

This module knows nothing of gRPC or HTTP: the servicer and the HTTP API map its exceptions
to their status codes.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from moe import MoELM
from services.router.metrics import RouterMetrics
from services.router.remote_model import required_expert_uids
from services.router.replicas import ReplicaSet

INT64 = 2**63


class RequestError(ValueError):
    """A request the router refuses as given; the message says what to change."""


class DeadlineExceeded(RuntimeError):
    """The caller's deadline passed before the model could be had (or between tokens)."""


class Overloaded(RuntimeError):
    """The model stayed busy with other requests for longer than the caller waits."""


@dataclass(frozen=True)
class GenerateParams:
    max_new_tokens: int
    temperature: float = 1.0   # 0 = greedy
    top_k: int = 0             # 0 = no top-k filter
    seed: int | None = None    # None = unseeded


@dataclass(frozen=True)
class Token:
    id: int
    text: str            # this token alone, decoded
    masked_calls: int    # expert calls masked while computing it


def check_params(params: GenerateParams, max_new_tokens: int, names: Mapping[str, str] | None = None) -> None:
    """The limits every transport applies; RequestError naming the field as the caller's wire calls
    it (`names` maps GenerateParams' field names to those, e.g. max_new_tokens -> max_tokens)."""
    names = names or {}
    field = lambda name: names.get(name, name)  # noqa: E731
    if not 1 <= params.max_new_tokens <= max_new_tokens:
        raise RequestError(f"{field('max_new_tokens')} must be in 1..{max_new_tokens} (ROUTER_MAX_NEW_TOKENS), "
                           f"got {params.max_new_tokens}")
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise RequestError(f"{field('temperature')} must be a finite number >= 0 (0 = greedy), "
                           f"got {params.temperature}")
    if params.top_k < 0:
        raise RequestError(f"{field('top_k')} must be >= 0 (0 = no filter), got {params.top_k}")
    if params.seed is not None and not -INT64 <= params.seed < INT64:
        raise RequestError(f"{field('seed')} must fit in 64 bits, got {params.seed}")


class RouterEngine:
    """Generate, Logits and Info on one model, for any number of transport threads."""

    def __init__(self, model: MoELM, tokenizer, replicas: ReplicaSet, metrics: RouterMetrics,
                 max_new_tokens: int, step: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.replicas = replicas
        self.metrics = metrics
        self.max_new_tokens = max_new_tokens
        self.step = step
        self._lock = threading.Lock()

    # ---- validation ---------------------------------------------------------------------------

    def tokens(self, ids: Sequence[int], field: str = "tokens") -> torch.Tensor:
        """(1, T) ids after the model's checks: 1..block_size ids, each below vocab_size."""
        cfg = self.model.cfg
        ids = list(ids)
        if not ids:
            raise RequestError(f"{field} is empty: send at least one token")
        if len(ids) > cfg.block_size:
            raise RequestError(f"{field} has {len(ids)} tokens; the model's context is {cfg.block_size}: "
                               f"shorten it")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise RequestError(f"{field} has ids outside [0, {cfg.vocab_size}): {bad[:5]}")
        return torch.tensor([ids], dtype=torch.long)

    def prompt(self, text: str = "", tokens: Sequence[int] = ()) -> torch.Tensor:
        """The prompt as ids: text (tokenized here) or token ids, not both."""
        if text and len(tokens):
            raise RequestError("give prompt or prompt_tokens, not both")
        if text:
            return self.tokens(self.tokenizer.encode(text), "prompt (tokenized)")
        return self.tokens(tokens, "prompt_tokens" if len(tokens) else "prompt")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ---- computation --------------------------------------------------------------------------

    def generate(self, idx: torch.Tensor, params: GenerateParams, *, deadline: float | None = None,
                 wait_s: float | None = None, active: Callable[[], bool] = lambda: True) -> Iterator[Token]:
        """Check `params` now (RequestError), then the tokens one by one as they are computed.

        `deadline` (time.monotonic) and `wait_s` bound each wait for the model; `active` is
        asked before each token (False: the caller went away, stop computing)."""
        check_params(params, self.max_new_tokens)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        top_k = min(params.top_k, self.model.cfg.vocab_size) or None  # top_k >= vocab filters nothing
        stream = self.model.stream(idx, params.max_new_tokens, temperature=params.temperature, top_k=top_k,
                                   generator=generator)
        return self._tokens(stream, deadline, wait_s, active)

    def _tokens(self, stream, deadline, wait_s, active) -> Iterator[Token]:
        started, produced = time.perf_counter(), 0
        try:
            while active():
                self._acquire(deadline, wait_s)
                try:
                    with torch.no_grad():   # per step: the consuming thread may differ from the last one
                        token = next(stream, None)
                    masked = int(self.model.last_stats.get("masked_calls", 0))
                finally:
                    self._lock.release()
                if token is None:
                    break
                produced += 1
                tok = int(token[0])
                yield Token(tok, self.tokenizer.decode([tok]), masked)
        finally:
            if inspect.getgeneratorstate(stream) != inspect.GEN_CREATED:
                with self._lock:  # its `finally` sets the model's train/eval mode: not while another computes
                    stream.close()
            if produced:
                self.metrics.tokens_per_second.set(produced / max(time.perf_counter() - started, 1e-9))

    def logits(self, idx: torch.Tensor, *, deadline: float | None = None,
               wait_s: float | None = None) -> tuple[torch.Tensor, int]:
        """(T, vocab) float logits of one sequence and the expert calls masked computing them."""
        self._acquire(deadline, wait_s)
        try:
            with torch.no_grad():
                logits, _ = self.model(idx)
            masked = int(self.model.last_stats.get("masked_calls", 0))
        finally:
            self._lock.release()
        return logits[0].float(), masked

    def info(self) -> dict:
        """What a client needs to form requests, and how many replicas serve each expert now."""
        cfg = self.model.cfg
        uids = required_expert_uids(cfg)
        return {"vocab_size": cfg.vocab_size, "block_size": cfg.block_size, "n_layer": cfg.n_layer,
                "dim": cfg.dim, "n_experts": cfg.n_experts, "n_activated_experts": cfg.n_activated_experts,
                "expert_uids": uids, "live_replicas": {uid: len(self.replicas.replicas(uid)) for uid in uids},
                "step": self.step}

    def _acquire(self, deadline: float | None, wait_s: float | None) -> None:
        """Take the model lock, or raise without it: no computation starts after the deadline."""
        limits = [wait_s] if wait_s is not None else []
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the deadline passed before the model was free")
            limits.append(left)
        timeout = min(limits) if limits else -1
        if self._lock.acquire(timeout=timeout):
            return
        if deadline is not None and deadline - time.monotonic() <= 0:
            raise DeadlineExceeded(f"the model stayed busy with other requests until the deadline "
                                   f"({timeout:.1f} s)")
        raise Overloaded(f"the model stayed busy with other requests for {timeout:.1f} s; try again")
