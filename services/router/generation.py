"""The router's model behind its transports: one validation and one decode loop for gRPC and HTTP.

    engine = RouterEngine(model, tokenizer, replicas, metrics, max_new_tokens=512, max_batch=64)
    idx = engine.prompt(text="ROMEO:")                                 # RequestError if unusable
    for token in engine.generate(idx, GenerateParams(max_new_tokens=20), deadline=...):
        send(token.text)
    engine.close()

Every Generate joins one continuous-batching loop (services/router/decode_loop.py): all active
streams advance together, one model step for all of them, so each expert gets one call per
layer for every user's token. Logits passes run on the same thread between two steps. Tokens
are handed to a request's own queue, never while the loop waits for a client: a client that
stops reading holds up only itself. A request whose deadline passes before it gets a slot is
never computed (DeadlineExceeded); one that waits for a slot longer than `wait_s` (HTTP's
bound), or arrives while `max_queued` others wait, gets Overloaded.

This module knows nothing of gRPC or HTTP: the servicer and the HTTP API map its exceptions
to their status codes.
"""

from __future__ import annotations

import math
import queue
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from moe import MoELM
from services.router.decode_loop import END, DecodeLoop, Expired, QueueFull, SamplingParams
from services.router.metrics import RouterMetrics
from services.router.remote_model import required_expert_uids
from services.router.replicas import ReplicaSet

INT64 = 2**63
# The lowest temperature that samples (0 is greedy). Below it sampling is all but greedy anyway, and
# one that is 0 in float32 (1e-46) made every logit NaN and the sampling raise.
MIN_TEMPERATURE = 0.01
# gRPC carries the temperature as a float32, in which 0.01 is 0.0099999998: MIN_TEMPERATURE itself
# must pass that way too.
_MIN_TEMPERATURE_F32 = struct.unpack("f", struct.pack("f", MIN_TEMPERATURE))[0]


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
    temperature = params.temperature
    if not (temperature == 0 or (math.isfinite(temperature) and temperature >= _MIN_TEMPERATURE_F32)):
        raise RequestError(f"{field('temperature')} must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                           f"got {temperature:.4g}")
    if params.top_k < 0:
        raise RequestError(f"{field('top_k')} must be >= 0 (0 = no filter), got {params.top_k}")
    if params.seed is not None and not -INT64 <= params.seed < INT64:
        raise RequestError(f"{field('seed')} must fit in 64 bits, got {params.seed}")


_POLL_S = 0.25   # how often a waiting reader looks at its deadline and whether its client is still there


class RouterEngine:
    """Generate, Logits and Info on one model, for any number of transport threads."""

    def __init__(self, model: MoELM, tokenizer, replicas: ReplicaSet, metrics: RouterMetrics,
                 max_new_tokens: int, step: int = 0, max_batch: int = 64, max_queued: int = 256):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.replicas = replicas
        self.metrics = metrics
        self.max_new_tokens = max_new_tokens
        self.step = step
        self.loop = DecodeLoop(self.model, max_batch=max_batch, max_queued=max_queued, metrics=metrics)

    def close(self) -> None:
        self.loop.close()

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
            self._check_length(text)
            return self.tokens(self.tokenizer.encode(text), "prompt (tokenized)")
        return self.tokens(tokens, "prompt_tokens" if len(tokens) else "prompt")

    def _check_length(self, text: str) -> None:
        """Refuse, before tokenizing it, a text too long for the context whatever its tokens: a gRPC
        prompt may be 64 MB, which takes the tokenizer tens of seconds (0.4-1 s a MB here)."""
        per_token = getattr(self.tokenizer, "max_token_chars", None)
        block = self.model.cfg.block_size
        if per_token and len(text) > block * per_token:
            raise RequestError(f"prompt has {len(text)} characters, more than the model's context of {block} "
                               f"tokens can hold (a token is at most {per_token} characters): shorten it")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ---- computation --------------------------------------------------------------------------

    def generate(self, idx: torch.Tensor, params: GenerateParams, *, deadline: float | None = None,
                 wait_s: float | None = None, active: Callable[[], bool] = lambda: True) -> Iterator[Token]:
        """Check `params` now (RequestError), queue the request (Overloaded when the queue is full),
        then the tokens one by one as the loop computes them.

        `deadline` (time.monotonic) bounds the whole request, `wait_s` the wait for a slot in the
        batch; `active` is asked while waiting (False: the caller went away, stop computing)."""
        check_params(params, self.max_new_tokens)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        top_k = min(params.top_k, self.model.cfg.vocab_size) or None  # top_k >= vocab filters nothing
        sampling = SamplingParams(params.max_new_tokens, params.temperature, top_k, generator)
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded("the deadline passed before the request was queued")
        try:
            stream = self.loop.submit(idx[0].tolist(), sampling, deadline=deadline)
        except QueueFull as e:
            raise Overloaded(f"{e}; try again") from None
        return self._tokens(stream, deadline, wait_s, active)

    def _tokens(self, stream, deadline, wait_s, active) -> Iterator[Token]:
        queued = time.monotonic()
        try:
            while True:
                try:
                    item = stream.out.get(timeout=_POLL_S)
                except queue.Empty:
                    now = time.monotonic()
                    if not active():
                        return
                    if deadline is not None and deadline <= now:
                        raise DeadlineExceeded("the deadline passed before the request was done") from None
                    if wait_s is not None and not stream.admitted.is_set() and now - queued > wait_s:
                        raise Overloaded(f"every slot of the batch stayed busy for {wait_s:.1f} s; "
                                         f"try again") from None
                    continue
                if item is END:
                    return
                if isinstance(item, Expired):
                    raise DeadlineExceeded(str(item))
                if isinstance(item, BaseException):
                    raise item
                token, masked = item
                yield Token(token, self.tokenizer.decode([token]), masked)
                if not active():
                    return
        finally:
            stream.cancel()   # a no-op for a finished stream; frees the slot of an abandoned one

    def logits(self, idx: torch.Tensor, *, deadline: float | None = None,
               wait_s: float | None = None) -> tuple[torch.Tensor, int]:
        """(T, vocab) float logits of one sequence and the expert calls masked computing them."""
        def compute():
            logits, _ = self.model(idx)
            return logits[0].float(), int(self.model.last_stats.get("masked_calls", 0))

        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded("the deadline passed before the model was free")
        try:
            return self.loop.run(compute, deadline=deadline, wait_s=wait_s)
        except Expired as e:
            if wait_s is None or (deadline is not None and deadline <= time.monotonic()):
                raise DeadlineExceeded(str(e)) from None
            raise Overloaded(f"the model stayed busy with other requests for {wait_s:.1f} s; try again") from None

    def info(self) -> dict:
        """What a client needs to form requests, and how many replicas serve each expert now."""
        cfg = self.model.cfg
        uids = required_expert_uids(cfg)
        return {"vocab_size": cfg.vocab_size, "block_size": cfg.block_size, "n_layer": cfg.n_layer,
                "dim": cfg.dim, "n_experts": cfg.n_experts, "n_activated_experts": cfg.n_activated_experts,
                "expert_uids": uids, "live_replicas": {uid: len(self.replicas.replicas(uid)) for uid in uids},
                "step": self.step}
