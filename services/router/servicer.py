"""moe.v1.Router over gRPC: Generate, Logits, Info. Only translation lives here: validation,
limits and the decode loop are the engine's (services/router/generation.py), shared with the
HTTP API.

A request's deadline is checked before it waits for the model and between tokens; a
Generate client that stops reading holds up only its own stream (the loop never waits for a
reader).
"""

from __future__ import annotations

import logging
import time

import grpc

from moe import MoELM
from services.router.decode_loop import ShuttingDown, StreamFailed
from services.router.generation import (
    DeadlineExceeded,
    GenerateParams,
    Overloaded,
    RequestError,
    RouterEngine,
)
from services.router.metrics import RouterMetrics
from services.router.replicas import ReplicaSet
from subnet.log_throttle import LogThrottle
from subnet.tensor_codec import encode
from subnet.wire.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

# StreamFailed: the decode loop already logged it (rate-limited); answered INTERNAL here, so gRPC
# does not log its own traceback per failed stream. ShuttingDown: the client should go elsewhere.
_CODES = {RequestError: grpc.StatusCode.INVALID_ARGUMENT, DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
          Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED, StreamFailed: grpc.StatusCode.INTERNAL,
          ShuttingDown: grpc.StatusCode.UNAVAILABLE}
_ANSWERED = tuple(_CODES)
# A Logits pass that fails (a bug, or a broken model) is logged with its traceback at most this often:
# a client can repeat the request at will.
_FAILED_PASSES = LogThrottle(10.0)


def _deadline(context) -> float | None:
    """The call's deadline on the time.monotonic clock; None when the client set none."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


def _abort(context, error: Exception):
    context.abort(_CODES[type(error)], str(error))


class RouterServicer(router_pb2_grpc.RouterServicer):
    """The gRPC face of a RouterEngine (built here; the HTTP API shares `servicer.engine`)."""

    def __init__(self, model: MoELM, tokenizer, replicas: ReplicaSet, metrics: RouterMetrics,
                 max_new_tokens: int, step: int = 0, max_batch: int = 64, max_queued: int = 256):
        self.engine = RouterEngine(model, tokenizer, replicas, metrics, max_new_tokens, step=step,
                                   max_batch=max_batch, max_queued=max_queued)

    def Generate(self, request, context):
        params = GenerateParams(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                                top_k=request.top_k, seed=request.seed or None)
        try:
            idx = self.engine.prompt(request.prompt, request.prompt_tokens)
            tokens = self.engine.generate(idx, params, deadline=_deadline(context), active=context.is_active)
            for token in tokens:
                yield router_pb2.GenerateResponse(token=token.id, text=token.text, masked_calls=token.masked_calls)
        except _ANSWERED as e:
            _abort(context, e)

    def Logits(self, request, context):
        try:
            idx = self.engine.tokens(request.tokens, "tokens")
            logits, masked = self.engine.logits(idx, deadline=_deadline(context))
        except _ANSWERED as e:
            _abort(context, e)
        except Exception:   # the model pass itself failed: INTERNAL, not gRPC's UNKNOWN and a traceback per call
            suppressed = _FAILED_PASSES.due()
            if suppressed is not None:
                log.exception("Logits: the model pass failed%s",
                              f" ({suppressed} more since the last one logged)" if suppressed else "")
            context.abort(grpc.StatusCode.INTERNAL, "the model pass failed inside the router; see its log")
        return router_pb2.LogitsResponse(logits=encode(logits, "fp32"), masked_calls=masked)

    def Info(self, request, context):
        return router_pb2.RouterInfoResponse(**self.engine.info())
