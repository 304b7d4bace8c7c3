"""`moe.v1.Expert` over grpc.aio: validate every request, hand it to the batcher or the
compute worker, encode the answer in the request's wire dtype. No compute happens here.

Every failure becomes a status code with a message a person can act on; an unexpected
exception becomes INTERNAL and is logged. Either way the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from typing import Any

import grpc
import torch

from services.expert import backend as be
from services.expert.batcher import Batcher, ComputeWorker, Overloaded, ShuttingDown
from services.expert.metrics import ExpertMetrics
from subnet.shm import ShmAttachments, ShmError, ShmUnavailableError, host_id
from subnet.spliced_wire import build
from subnet.tensor_codec import (
    SHM_INLINE_HINT,
    SHM_WIRE_DTYPES,
    TensorError,
    all_finite,
    decode,
    encode_view,
    shm_dtype,
    shm_tensor,
    wire_dtype_name,
)
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)
Code = grpc.StatusCode

_STATUS: dict[type[Exception], grpc.StatusCode] = {
    be.UnknownExpert: Code.NOT_FOUND,
    be.ActivationsMissing: Code.FAILED_PRECONDITION,
    be.StepConflict: Code.FAILED_PRECONDITION,
    be.DuplicateBackward: Code.ALREADY_EXISTS,
    be.NonFiniteGradients: Code.FAILED_PRECONDITION,
    be.BadRequest: Code.INVALID_ARGUMENT,
    Overloaded: Code.RESOURCE_EXHAUSTED,
    ShuttingDown: Code.UNAVAILABLE,
}
# Decoding/encoding a tensor this big takes long enough to stall the event loop: use a thread.
_OFFLOAD_ELEMENTS = 1 << 20

try:
    SERVER_VERSION = f"moe-subnet {metadata.version('moe-subnet')}"
except metadata.PackageNotFoundError:
    SERVER_VERSION = "moe-subnet (not installed)"


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    """Turns RPCs into backend/batcher calls. Holds no model state of its own."""

    def __init__(self, backend: be.ExpertBackend, batcher: Batcher, worker: ComputeWorker, *,
                 allowed_dtypes: tuple[int, ...], max_request_tokens: int, max_message_bytes: int,
                 device: str, metrics: ExpertMetrics | None = None, inject_delay_ms: float = 0.0,
                 shm: ShmAttachments | None = None, frames_port: int = 0):
        self.backend = backend
        self.batcher = batcher
        self.worker = worker
        self.allowed_dtypes = allowed_dtypes
        self.max_request_tokens = max_request_tokens
        self.max_message_bytes = max_message_bytes
        self.device = device
        self.metrics = metrics
        self.inject_delay_s = inject_delay_ms / 1000
        self.shm = shm   # None: tensors in shared memory are refused (FAILED_PRECONDITION: resend inline)
        self.shm_host_id = host_id(shm.config.directory) if shm is not None else ""
        self.frames_port = frames_port   # 0: gRPC only

    # -- RPCs -------------------------------------------------------------------------------

    async def Forward(self, request: expert_pb2.ForwardRequest, context) -> expert_pb2.ForwardResponse:
        async def run():
            uid = self._uid(request.expert_uid)
            _check_step(request.step)
            if request.training and not request.call_id:
                raise RpcError(Code.INVALID_ARGUMENT, "call_id is required when training is true "
                                                      "(it keys the activations kept for Backward)")
            _check_call_id(request.call_id)
            committed = _committed_round(request)
            # Inference reads its inputs in the caller's shared-memory region, if that is where they
            # are: the caller keeps the region until the answer. Training keeps them for Backward: a copy.
            x = await self._tensor(request, "inputs", shm_copy=request.training)
            await self._delay()
            y = None
            if committed is not None:   # a validator's probe: on the compute thread, outside the batches
                y = await self.worker.run(self.backend.forward_committed, uid, x, committed)
            if y is None:
                y = await self.batcher.forward(uid, x, request.call_id if request.training else None)
            self._count(uid, "Forward", x.shape[0])
            outputs = await self._encode(y, request.inputs.dtype, "outputs", _reply_area(request))
            return build(expert_pb2.ForwardResponse, outputs=outputs)
        return await self._handle("Forward", context, run)

    async def ForwardMany(self, request: expert_pb2.ForwardManyRequest, context) -> expert_pb2.ForwardManyResponse:
        async def run():
            uids, tokens = self._many(request.expert_uids, request.tokens)
            _check_step(request.step)
            x = await self._tensor(request, "inputs")
            if x.shape[0] != sum(tokens):
                raise RpcError(Code.INVALID_ARGUMENT, f"inputs has {x.shape[0]} rows but tokens add up to "
                                                      f"{sum(tokens)}; send one count per expert, in order")
            await self._delay()
            outputs = await self.batcher.forward_many(list(zip(uids, torch.split(x, tokens))))
            for uid, n in zip(uids, tokens):
                self._count(uid, "Forward", n)
            y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            return build(expert_pb2.ForwardManyResponse, outputs=await self._encode(y, request.inputs.dtype, "outputs"))
        return await self._handle("ForwardMany", context, run)

    async def Backward(self, request: expert_pb2.BackwardRequest, context) -> expert_pb2.BackwardResponse:
        async def run():
            uid = self._uid(request.expert_uid)
            _check_step(request.step)
            if not request.call_id:
                raise RpcError(Code.INVALID_ARGUMENT, "call_id is required: the call_id of the training Forward")
            _check_call_id(request.call_id)
            g = await self._tensor(request, "grad_outputs")
            x = await self._tensor(request, "inputs") if request.HasField("inputs") else None
            apply_now = _apply_now(request)
            await self._delay()
            session = _session(request.session_id)
            dx, version = await self.worker.submit("Backward", self._backward, uid, request.call_id, request.step, g,
                                                   x, session, apply_now)
            self._count(uid, "Backward", g.shape[0])
            if apply_now is not None and self.metrics is not None:
                self.metrics.version.labels(expert=uid).set(version)
            grad_inputs = await self._encode(dx, request.grad_outputs.dtype, "grad_inputs", _reply_area(request))
            return build(expert_pb2.BackwardResponse, grad_inputs=grad_inputs,
                         version=version if apply_now is not None else 0)
        return await self._handle("Backward", context, run)

    async def GradNorm(self, request: expert_pb2.GradNormRequest, context) -> expert_pb2.GradNormResponse:
        async def run():
            uid = self._uid(request.expert_uid)
            _check_step(request.step)
            sq, calls = await self.worker.submit("GradNorm", self.backend.grad_sq_norm, uid, request.step,
                                                 _session(request.session_id))
            return expert_pb2.GradNormResponse(sq_norm=sq, backward_calls=calls)
        return await self._handle("GradNorm", context, run)

    async def ApplyStep(self, request: expert_pb2.ApplyStepRequest, context) -> expert_pb2.ApplyStepResponse:
        async def run():
            uid = self._uid(request.expert_uid)
            _check_step(request.step)
            r = request
            session = _session(r.session_id)
            if r.skip:  # the hyperparameters are ignored, so not checked either
                version = await self.worker.submit("ApplyStep", self.backend.skip_step, uid, r.step, session)
            else:
                _check_step_settings(r)
                _check_hyper("grad_scale", r.grad_scale, r.grad_scale >= 0, ">= 0 (0 means 1)")
                version = await self.worker.submit("ApplyStep", self.backend.apply_step, uid, r.step, r.lr,
                                                   r.grad_scale, r.weight_decay, r.beta1, r.beta2, r.eps, session)
            if self.metrics is not None:
                self.metrics.version.labels(expert=uid).set(version)
            return expert_pb2.ApplyStepResponse(version=version)
        return await self._handle("ApplyStep", context, run)

    async def Info(self, request: expert_pb2.InfoRequest, context) -> expert_pb2.InfoResponse:
        async def run():
            b = self.backend
            experts = [expert_pb2.ExpertInfo(uid=uid, dim=b.dim, inter_dim=b.inter_dim,
                                             param_dtype=tensor_pb2.DTYPE_FLOAT32, version=b.version(uid),
                                             queued_tokens=self.batcher.queued_tokens(uid))
                       for uid in b.uids]
            return expert_pb2.InfoResponse(experts=experts, wire_dtypes=self.allowed_dtypes,
                                           max_tokens=self.max_request_tokens,
                                           max_message_bytes=self.max_message_bytes,
                                           device=self.device, server_version=SERVER_VERSION,
                                           shm_host_id=self.shm_host_id, frames_port=self.frames_port)
        return await self._handle("Info", context, run)

    # -- helpers ----------------------------------------------------------------------------

    def _backward(self, uid: str, call_id: str, step: int, g: torch.Tensor, x: torch.Tensor | None, session: str,
                  apply_now: be.StepNow | None) -> tuple[torch.Tensor, int]:
        """The backend's Backward and the version after it, in one turn of the compute thread."""
        dx = self.backend.backward(uid, call_id, step, g, x, session, apply_now=apply_now)
        return dx, self.backend.version(uid)

    async def _handle(self, rpc: str, context, run: Callable[[], Awaitable[Any]]) -> Any:
        """Run one RPC body: time it, turn every failure into a status code, count errors."""
        start = time.perf_counter()
        code, message = Code.OK, ""
        try:
            return await run()
        except (RpcError, TensorError) as e:
            code, message = e.code, e.message
        except tuple(_STATUS) as e:
            code, message = _STATUS[type(e)], str(e)
        except asyncio.CancelledError:
            code = Code.CANCELLED
            raise
        except Exception:  # a bug must not take the server down
            log.exception("%s failed", rpc)
            code, message = Code.INTERNAL, f"{rpc} failed inside the expert service; see its log"
        finally:
            if self.metrics is not None:
                self.metrics.rpc_latency_of(rpc).observe(time.perf_counter() - start)
                if code != Code.OK:
                    self.metrics.rpc_errors.labels(rpc=rpc, code=code.name).inc()
        await context.abort(code, message)

    def _uid(self, uid: str) -> str:
        if not uid:
            raise RpcError(Code.INVALID_ARGUMENT, f"expert_uid is required; this service hosts "
                                                  f"{', '.join(self.backend.uids)}")
        if len(uid) > MAX_UID_CHARS or not _UID_PATTERN.fullmatch(uid):
            raise RpcError(Code.INVALID_ARGUMENT, f"expert_uid {_clip(uid)} is not '<layer>.<index>' "
                                                  f"(digits, at most {MAX_UID_CHARS} characters)")
        if uid not in self.backend.uids:
            raise RpcError(Code.NOT_FOUND, f"expert {uid!r} is not hosted here; hosted: "
                                           f"{', '.join(self.backend.uids)[:200]}")
        return uid

    def _many(self, uids: Sequence[str], tokens: Sequence[int]) -> tuple[list[str], list[int]]:
        """ForwardMany's experts and row counts, checked: distinct hosted uids, one count >= 1 each."""
        hosted = len(self.backend.uids)
        if not uids:
            raise RpcError(Code.INVALID_ARGUMENT, "expert_uids is empty: name the experts whose rows inputs holds")
        if len(uids) > hosted:   # before anything per uid: a request may name millions
            raise RpcError(Code.INVALID_ARGUMENT, f"expert_uids names {len(uids)} experts; this service hosts "
                                                  f"{hosted}, and each may appear once")
        if len(tokens) != len(uids):
            raise RpcError(Code.INVALID_ARGUMENT, f"tokens has {len(tokens)} counts for {len(uids)} expert_uids; "
                                                  f"send one per expert")
        checked = [self._uid(uid) for uid in uids]
        if len(set(checked)) != len(checked):
            raise RpcError(Code.INVALID_ARGUMENT, "expert_uids names an expert twice; put all its rows under one")
        if min(tokens) < 1:
            raise RpcError(Code.INVALID_ARGUMENT, "every count in tokens must be >= 1 (leave an expert without "
                                                  "rows out of expert_uids)")
        return checked, list(tokens)

    async def _tensor(self, request: Any, field: str, shm_copy: bool = True) -> torch.Tensor:
        if not request.HasField(field):
            raise RpcError(Code.INVALID_ARGUMENT, f"{field} is required: a (tokens, {self.backend.dim}) tensor")
        msg = getattr(request, field)
        if len(msg.shape) != 2:  # before anything reads the shape: it may hold millions of entries
            raise RpcError(Code.INVALID_ARGUMENT, f"{field} has {len(msg.shape)} dimensions; expected "
                                                  f"(tokens, {self.backend.dim})")
        if msg.shape[0] > self.max_request_tokens:
            raise RpcError(Code.RESOURCE_EXHAUSTED,
                           f"{field} has {msg.shape[0]} tokens; this service accepts at most "
                           f"{self.max_request_tokens} per request; split the batch")
        kwargs = {"expected_dim": self.backend.dim, "max_elements": self.max_request_tokens * self.backend.dim,
                  "allowed": self.allowed_dtypes, "name": field, "shm": self.shm.read if self.shm is not None else None,
                  "shm_copy": shm_copy}
        if abs(math.prod(msg.shape)) >= _OFFLOAD_ELEMENTS:  # not len(msg.data): upb copies on access
            return await asyncio.to_thread(decode, msg, **kwargs)
        return decode(msg, **kwargs)

    async def _encode(self, t: torch.Tensor, dtype: int, what: str, reply: tensor_pb2.ShmReply | None = None):
        """Encode an answer; a non-finite one (finite but huge inputs overflow) is refused, not sent.
        With a `reply` area (a caller on this host), the bytes go there and the message says where."""
        name = wire_dtype_name(dtype)
        if reply is not None:
            if t.numel() >= _OFFLOAD_ELEMENTS:
                return await asyncio.to_thread(self._encode_shm, t, name, what, reply)
            return self._encode_shm(t, name, what, reply)
        if t.numel() >= _OFFLOAD_ELEMENTS:
            return await asyncio.to_thread(encode_view, t, name, check_finite=what)
        return encode_view(t, name, check_finite=what)   # copied once, into the response body

    def _encode_shm(self, t: torch.Tensor, name: str, what: str, reply: tensor_pb2.ShmReply) -> tensor_pb2.Tensor:
        if self.shm is None:
            raise RpcError(Code.FAILED_PRECONDITION, "reply_shm given, but this service takes no shared memory "
                                                     f"(SHM_TRANSPORT=off or no tmpfs); {SHM_INLINE_HINT}")
        if name not in SHM_WIRE_DTYPES:
            raise RpcError(Code.INVALID_ARGUMENT, f"reply_shm carries {', '.join(SHM_WIRE_DTYPES)}, not {name}")
        wire = t.detach().to(device="cpu", dtype=shm_dtype(name)).contiguous()
        if not all_finite(wire):
            raise RpcError(Code.INVALID_ARGUMENT, f"{what} would not be finite in {name} (overflow); the inputs "
                                                  f"are too large for this expert: scale them down or use a wider "
                                                  f"wire dtype")
        try:
            nbytes = self.shm.write(reply.region, reply.offset, reply.capacity, wire)
        except ShmUnavailableError as e:
            raise RpcError(Code.FAILED_PRECONDITION, f"reply_shm: {e}; {SHM_INLINE_HINT}") from None
        except ShmError as e:
            raise RpcError(Code.INVALID_ARGUMENT, f"reply_shm: {e}") from None
        return shm_tensor(name, wire.shape, reply.region, reply.offset, nbytes)

    async def _delay(self) -> None:
        if self.inject_delay_s > 0:
            await asyncio.sleep(self.inject_delay_s)

    def _count(self, uid: str, rpc: str, tokens: int) -> None:
        if self.metrics is not None:
            self.metrics.tokens_of(uid, rpc).inc(tokens)
            self.metrics.activation_cache_bytes.set(self.backend.cache.nbytes)


def _committed_round(request) -> int | None:
    """The round whose committed weights a validator's probe asks for, or None (the live weights)."""
    if not request.HasField("committed_round"):
        return None
    if request.training or request.committed_round < 0:
        raise RpcError(Code.INVALID_ARGUMENT, f"committed_round {request.committed_round}: a probe of the weights "
                                              f"committed in a round >= 0, for inference only (training=false)")
    return request.committed_round


def _reply_area(request) -> tensor_pb2.ShmReply | None:
    return request.reply_shm if request.HasField("reply_shm") else None


def _check_step(step: int) -> None:
    if step < 0:
        raise RpcError(Code.INVALID_ARGUMENT, f"step must be >= 0, got {step}")


# Identifiers are kept in memory (activation cache keys, gradient bookkeeping) and echoed in
# error messages, so they are short and printable; anything echoed is clipped besides.
MAX_SESSION_ID_CHARS = 64
MAX_CALL_ID_CHARS = 128
MAX_UID_CHARS = 16
_UID_PATTERN = re.compile(r"[0-9]{1,7}\.[0-9]{1,7}")


def _clip(text: str, limit: int = 40) -> str:
    """`text` quoted for an error message, cut to `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _check_call_id(call_id: str) -> None:
    if len(call_id) > MAX_CALL_ID_CHARS or not call_id.isprintable():
        raise RpcError(Code.INVALID_ARGUMENT, f"call_id must be at most {MAX_CALL_ID_CHARS} printable characters "
                                              f"(got {len(call_id)}: {_clip(call_id)})")


def _session(session_id: str) -> str:
    """The training session id: short and printable, because it is kept in memory and echoed."""
    if len(session_id) > MAX_SESSION_ID_CHARS or not session_id.isprintable():
        raise RpcError(Code.INVALID_ARGUMENT, f"session_id must be at most {MAX_SESSION_ID_CHARS} printable "
                                              f"characters (got {len(session_id)})")
    return session_id


# ApplyStep's limits (documented in expert.proto). AdamW moves each weight by about lr per step,
# so an lr past 1 only destroys weights; eps below fp32's range is 0 there, and m / 0 is Inf.
MAX_LR = 1.0
MIN_EPS = 1e-30


def _check_step_settings(r: expert_pb2.ApplyStepRequest | expert_pb2.ApplyNow) -> None:
    """The AdamW numbers an ApplyStep and a Backward's ApplyNow share, each finite and in its range,
    before any is used; each caller checks its own other field."""
    _check_hyper("lr", r.lr, 0 <= r.lr <= MAX_LR, f"in [0, {MAX_LR:g}]")
    _check_hyper("weight_decay", r.weight_decay, r.weight_decay >= 0 and r.lr * r.weight_decay <= 1,
                 f">= 0 with lr * weight_decay <= 1 (lr={r.lr})")
    _check_hyper("beta1", r.beta1, 0 <= r.beta1 < 1, "in [0, 1)")
    _check_hyper("beta2", r.beta2, 0 <= r.beta2 < 1, "in [0, 1)")
    _check_hyper("eps", r.eps, r.eps >= MIN_EPS, f">= {MIN_EPS:g} (0 usually means the field was not set)")


def _apply_now(request) -> be.StepNow | None:
    """A Backward's asynchronous step, checked; None for a synchronous Backward."""
    if not request.HasField("apply_now"):
        return None
    a = request.apply_now
    _check_step_settings(a)
    _check_hyper("apply_now.max_grad_norm", a.max_grad_norm, a.max_grad_norm >= 0, ">= 0 (0 = no clipping)")
    return be.StepNow(lr=a.lr, weight_decay=a.weight_decay, beta1=a.beta1, beta2=a.beta2, eps=a.eps,
                      max_grad_norm=a.max_grad_norm)


def _check_hyper(name: str, value: float, ok: bool, rule: str) -> None:
    if not math.isfinite(value) or not ok:
        raise RpcError(Code.INVALID_ARGUMENT, f"{name}={value} must be {rule}")
