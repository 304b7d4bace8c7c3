"""moe.v1.Router over gRPC: Generate, Logits, Info. Only validation and translation live here.

The model runs one request at a time (a lock): its remote expert groups keep per-call
state, and on a CPU router parallel requests would only fight over the same cores.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import torch

from moe import MoELM
from services.router.metrics import RouterMetrics
from services.router.remote_model import required_expert_uids
from services.router.replicas import ReplicaSet
from subnet.tensor_codec import encode
from subnet.wire.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, model: MoELM, tokenizer, replicas: ReplicaSet, metrics: RouterMetrics,
                 max_new_tokens: int, step: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.replicas = replicas
        self.metrics = metrics
        self.max_new_tokens = max_new_tokens
        self.step = step
        self._lock = threading.Lock()

    # ---- validation -------------------------------------------------------------------------

    def _tokens(self, ids, context, field: str) -> torch.Tensor:
        cfg = self.model.cfg
        ids = list(ids)
        if not ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is empty: send at least one token")
        if len(ids) > cfg.block_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field} has {len(ids)} tokens; the model's context is {cfg.block_size}")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field} has ids outside [0, {cfg.vocab_size}): {bad[:5]}")
        return torch.tensor([ids], dtype=torch.long)

    def _prompt(self, request, context) -> torch.Tensor:
        if request.prompt and request.prompt_tokens:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give prompt or prompt_tokens, not both")
        if request.prompt:
            ids = self.tokenizer.encode(request.prompt)[-self.model.cfg.block_size:]
            return self._tokens(ids, context, "prompt (tokenized)")
        return self._tokens(request.prompt_tokens, context, "prompt_tokens")

    # ---- RPCs -------------------------------------------------------------------------------

    def Generate(self, request, context):
        if not 1 <= request.max_new_tokens <= self.max_new_tokens:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"max_new_tokens must be in 1..{self.max_new_tokens}, got {request.max_new_tokens}")
        if not (request.temperature >= 0 and request.temperature < float("inf")):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"temperature must be >= 0, got {request.temperature}")
        if request.top_k < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be >= 0, got {request.top_k}")
        idx = self._prompt(request, context)
        generator = torch.Generator().manual_seed(request.seed) if request.seed else None
        with self._lock:
            started = time.perf_counter()
            produced = 0
            for token in self.model.stream(idx, request.max_new_tokens, temperature=request.temperature,
                                           top_k=request.top_k or None, generator=generator):
                if not context.is_active():
                    break                                   # the client went away: stop spending compute
                tok = int(token[0])
                produced += 1
                yield router_pb2.GenerateResponse(token=tok, text=self.tokenizer.decode([tok]),
                                                  masked_calls=int(self.model.last_stats.get("masked_calls", 0)))
            elapsed = time.perf_counter() - started
            if produced:
                self.metrics.tokens_per_second.set(produced / max(elapsed, 1e-9))

    def Logits(self, request, context):
        idx = self._tokens(request.tokens, context, "tokens")
        with self._lock, torch.no_grad():
            logits, _ = self.model(idx)
            masked = int(self.model.last_stats.get("masked_calls", 0))
        return router_pb2.LogitsResponse(logits=encode(logits[0].float(), "fp32"), masked_calls=masked)

    def Info(self, request, context):
        cfg = self.model.cfg
        uids = required_expert_uids(cfg)
        live = {uid: len(self.replicas.replicas(uid)) for uid in uids}
        return router_pb2.RouterInfoResponse(
            vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, dim=cfg.dim,
            n_experts=cfg.n_experts, n_activated_experts=cfg.n_activated_experts, expert_uids=uids,
            live_replicas=live, step=self.step)
