"""The calls a RemoteExpertGroup sends (services/router/remote_experts.py): one class per RPC, each
knowing how to send itself on a client, take its answer, and whether it may be sent again.

- `ForwardCall` (one expert's tokens; its inputs and outputs go through shared memory when the
  replica shares the host, see ShmCall) and `ForwardManyCall` (several experts of one replica in one
  serving call);
- `BackwardCall`, sent to the replica that served the Forward, never twice on a transport error;
- `GradNormCall` and `ApplyStepCall`, the step control of synchronous training (StepCall: retried
  on connection failures while their budget lasts).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import grpc
import torch

from moe.boundary import OptimizerSettings
from services.router.replicas import ReplicaSet
from subnet.expert_client import ExpertClient
from subnet.shm import ShmError, ShmRegion
from subnet.shm_link import ShmLink
from subnet.tensor_codec import (
    RESEND_INPUTS_HINT,
    SHM_INLINE_HINT,
    SHM_WIRE_DTYPES,
    TensorError,
    decode,
    encode_view,
    shm_dtype,
    shm_tensor,
)
from subnet.wire.v1 import expert_pb2, tensor_pb2

log = logging.getLogger(__name__)


def grad_wire_dtype(wire_dtype: str) -> str:
    """The wire dtype of gradients (grad_outputs, hence grad_inputs) when activations travel in
    `wire_dtype`: bf16 for fp16, whose range (down to 6e-8) is too short for gradients; the
    others already have fp32's range (int8 through its fp32 block scales), so they stay."""
    return "bf16" if wire_dtype == "fp16" else wire_dtype


class Call:
    """One logical RPC to one expert. The engine (`RemoteExpertGroup._gather`) sends it,
    perhaps again, until it succeeds (`accept`) or is given up (`failed` stays set)."""

    rpc = ""

    def __init__(self, uid: str, tokens: int, endpoint: str | None = None):
        self.uid = uid
        self.tokens = tokens
        self.endpoint = endpoint
        self.attempts = 0
        self.attempt_budget_s: float | None = None   # the most one attempt may take; None = all that is left
        self.retry_pause_s = 0.0   # waited before another attempt (see StepCall)
        self.failed_at: set[str] = set()   # endpoints an attempt failed at (and made suspect)
        self.failed: tuple[str, str] | None = None  # (reason, details) once given up

    @property
    def uids(self) -> tuple[str, ...]:
        """The experts this call is for (several for a ForwardMany)."""
        return (self.uid,)

    def target(self, replicas: ReplicaSet) -> str | None:
        """Endpoint of the next attempt; None = nowhere to send it."""
        return self.endpoint if self.attempts == 0 else None

    def send(self, client: ExpertClient, timeout_s: float, metadata) -> Future:
        raise NotImplementedError

    def accept(self, response) -> None:
        """Take the response; raises TensorError when it cannot be used."""

    def hand_over(self) -> None:
        """After `accept`, before `settle`: outputs go to whoever takes them as they arrive (streaming)."""

    def again(self, code: grpc.StatusCode, details: str = "") -> bool:
        """Whether to send another attempt after this status."""
        return False

    def settle(self, ok: bool) -> None:
        """An attempt ended (`ok`: answered and accepted); release what it held."""

    def blames_endpoint(self, code: grpc.StatusCode) -> bool:
        """Whether this failure makes the endpoint suspect for the call's experts."""
        return True


class ShmCall(Call):
    """A call whose tensor may go through shared memory (subnet/shm_link.py): when the endpoint shares
    this host's memory, each attempt writes its tensor into a region of its own and the expert writes
    the answer into the same region; gRPC carries only where. The answer is copied out (decode), then
    the region goes back to the pool; an attempt that failed or timed out discards its region, since
    the expert may still write into it. A refusal ("cannot attach") resends the call inline."""

    def __init__(self, uid: str, tokens: int, endpoint: str | None = None):
        super().__init__(uid, tokens, endpoint)
        self._link: ShmLink | None = None
        self._region: ShmRegion | None = None
        self.shm_refused = False

    def _shm_request(self, client: ExpertClient, x: torch.Tensor, wire_dtype: str, dim: int):
        """(tensor message, reply area) in shared memory for this attempt, or (None, None) for inline."""
        link = client.shm
        if link is None or self.shm_refused or wire_dtype not in SHM_WIRE_DTYPES or \
                x.numel() * x.element_size() < link.config.min_kb * 1024 or not link.usable(client.endpoint):
            return None, None
        dtype = shm_dtype(wire_dtype)
        self._link = link
        try:
            self._region = link.acquire()
            req = self._region.write_request(x, output_nbytes=self.tokens * dim * dtype.itemsize, dtype=dtype)
        except ShmError as e:   # e.g. the tmpfs is full: this attempt goes inline
            log.warning("expert %s: no shared memory for this call (%s); sending it inline", self.uid, e)
            self.settle(False)
            return None, None
        except Exception:
            self.settle(False)
            raise
        tensor = shm_tensor(wire_dtype, x.shape, self._region.name, req.input_offset, req.input_nbytes)
        return tensor, tensor_pb2.ShmReply(region=self._region.name, offset=req.output_offset,
                                           capacity=req.output_capacity)

    def _read_reply(self, region: str, offset: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
        """decode's reader of the answer: only this attempt's region."""
        if self._region is None or region != self._region.name:
            raise ShmError(f"the answer points at region {region!r}, not this call's")
        return self._region.view(offset, nbytes, dtype, shape)

    def _refused_shm(self, code: grpc.StatusCode, details: str) -> bool:
        """Whether this failure says "shared memory does not work here" (then the next attempt is inline)."""
        if code is not grpc.StatusCode.FAILED_PRECONDITION or SHM_INLINE_HINT not in details or self.shm_refused:
            return False
        self.shm_refused = True
        if self._link is not None and self.endpoint is not None:
            self._link.refused(self.endpoint)
        return True

    def settle(self, ok: bool) -> None:
        if self._region is not None:
            (self._link.release if ok else self._link.discard)(self._region)
            self._region = None


class ForwardCall(ShmCall):
    rpc = "Forward"

    def __init__(self, uid: str, x: torch.Tensor, wire_dtype: str, dim: int, call_id: str, step: int,
                 training: bool, retries: int, expert: int = -1,
                 on_answer: Callable[[ForwardCall], None] | None = None):
        """`expert`: its index in the layer; `on_answer`: called with this Forward once its answer is
        accepted (RemoteExpertGroup.run_streaming)."""
        super().__init__(uid, x.shape[0])
        self._x, self._wire_dtype, self._encoded = x, wire_dtype, None
        self.dim, self.call_id, self.step, self.training = dim, call_id, step, training
        self.retries = retries
        self.tried: set[str] = set()
        self.first: str | None = None   # where the first attempt goes, when chosen already
        self.outputs: torch.Tensor | None = None
        self.answered = False   # outputs accepted (they may have been handed over and dropped since)
        self.expert, self.on_answer = expert, on_answer
        self.outputs_view = False   # the outputs view memory they do not own (the response's bytes)

    def target(self, replicas: ReplicaSet) -> str | None:
        if self.attempts == 0 and self.first is not None:
            return self.first
        replica = replicas.choose(self.uid, exclude=self.tried, by_score=not self.training)
        return None if replica is None else replica.endpoint

    @property
    def inputs(self):
        # Encoded when first sent, not up front: the first expert starts computing while the
        # router still encodes the tensors of the others.
        if self._encoded is None:
            self._encoded = encode_view(self._x, self._wire_dtype)
        return self._encoded

    def send(self, client, timeout_s, metadata):
        self.tried.add(client.endpoint)
        inputs, reply = self._shm_request(client, self._x, self._wire_dtype, self.dim)
        # A new call id per attempt: an abandoned attempt may still hold activations under the old one.
        return client.forward(self.uid, self.inputs if inputs is None else inputs,
                              call_id=f"{self.call_id}/{self.attempts}", step=self.step, training=self.training,
                              timeout_s=timeout_s, metadata=metadata, reply_shm=reply, inline=True)

    @property
    def served_call_id(self) -> str:
        return f"{self.call_id}/{self.attempts}"  # the last attempt sent is the one that succeeded

    def accept(self, response):
        out = decode(response.outputs, expected_dim=self.dim, max_elements=self.tokens * self.dim,
                     name="outputs", shm=self._read_reply)
        if out.shape[0] != self.tokens:
            raise TensorError(grpc.StatusCode.INTERNAL,
                              f"outputs have {out.shape[0]} rows for {self.tokens} tokens")
        self.outputs, self.answered = out, True
        self.outputs_view = views_message(response.outputs)

    def hand_over(self):
        if self.on_answer is not None:
            self.on_answer(self)

    def owned_outputs(self, like: torch.Tensor) -> torch.Tensor:
        """The outputs in `like`'s dtype and device, in memory of their own: outputs that view the read-only
        response bytes are copied (autograd may write in place); those decoded into memory of their own
        (out of shared memory, from bf16) are handed over as they are."""
        return self.outputs.to(dtype=like.dtype, device=like.device, copy=self.outputs_view)

    def again(self, code, details=""):
        if self._refused_shm(code, details):
            self.tried.discard(self.endpoint)   # the same replica may serve it, inline
            return True
        # INVALID_ARGUMENT: the request is wrong, every replica would say the same.
        return code is not grpc.StatusCode.INVALID_ARGUMENT and self.attempts <= self.retries


class ForwardManyCall(Call):
    """The serving Forwards of one layer that went to the same endpoint, as one ForwardMany call
    (inline; their tensors are small). It is never retried as a whole: when it fails, each of its
    Forwards is sent again on its own (`RemoteExpertGroup._serve`)."""
    rpc = "ForwardMany"

    def __init__(self, forwards: Sequence[ForwardCall], endpoint: str, wire_dtype: str, dim: int, step: int):
        super().__init__(",".join(f.uid for f in forwards), sum(f.tokens for f in forwards), endpoint)
        self.forwards, self.wire_dtype, self.dim, self.step = list(forwards), wire_dtype, dim, step

    @property
    def uids(self) -> tuple[str, ...]:
        return tuple(f.uid for f in self.forwards)

    def send(self, client, timeout_s, metadata):
        x = torch.cat([f._x for f in self.forwards])
        return client.forward_many(self.uids, [f.tokens for f in self.forwards], encode_view(x, self.wire_dtype),
                                   step=self.step, timeout_s=timeout_s, metadata=metadata, inline=True)

    def accept(self, response):
        out = decode(response.outputs, expected_dim=self.dim, max_elements=self.tokens * self.dim, name="outputs")
        if out.shape[0] != self.tokens:
            raise TensorError(grpc.StatusCode.INTERNAL, f"outputs have {out.shape[0]} rows for {self.tokens} tokens")
        views = views_message(response.outputs)   # one message: the same for every Forward's rows
        for forward, rows in zip(self.forwards, torch.split(out, [f.tokens for f in self.forwards])):
            forward.outputs, forward.endpoint, forward.answered = rows, self.endpoint, True
            forward.outputs_view = views

    def hand_over(self):
        for forward in self.forwards:
            forward.hand_over()

    def blames_endpoint(self, code):
        return code is not grpc.StatusCode.UNIMPLEMENTED   # an older service: its Forwards work


class BackwardCall(ShmCall):
    rpc = "Backward"

    def __init__(self, forward: ForwardCall, grad_outputs: torch.Tensor, wire_dtype: str, session_id: str,
                 apply_now: expert_pb2.ApplyNow | None = None):
        super().__init__(forward.uid, forward.tokens, forward.endpoint)
        self.forward, self._grad, self.session_id = forward, grad_outputs, session_id
        self.apply_now = apply_now   # asynchronous training: the expert steps on this call's gradients
        self._wire_dtype, self._encoded = wire_dtype, None
        self.with_inputs = False
        self.grad_inputs: torch.Tensor | None = None

    def target(self, replicas):
        return self.endpoint  # only the replica that served the Forward holds its activations

    def send(self, client, timeout_s, metadata):
        f = self.forward
        grad, reply = self._shm_request(client, self._grad, self._wire_dtype, f.dim)
        if grad is None:
            if self._encoded is None:
                self._encoded = encode_view(self._grad, self._wire_dtype)
            grad = self._encoded
        return client.backward(self.uid, grad, call_id=f.served_call_id, step=f.step,
                               inputs=f.inputs if self.with_inputs else None, timeout_s=timeout_s,
                               session_id=self.session_id, metadata=metadata, reply_shm=reply, inline=True,
                               apply_now=self.apply_now)

    def accept(self, response):
        grad = decode(response.grad_inputs, expected_dim=self.forward.dim,
                      max_elements=self.tokens * self.forward.dim, name="grad_inputs", shm=self._read_reply)
        if grad.shape[0] != self.tokens:
            raise TensorError(grpc.StatusCode.INTERNAL,
                              f"grad_inputs have {grad.shape[0]} rows for {self.tokens} tokens")
        # A view of the response's read-only bytes is copied (autograd may add into it in place); a
        # tensor decoded into memory of its own (out of shared memory, from bf16) is used as it is.
        self.grad_inputs = grad.clone() if views_message(response.grad_inputs) else grad

    def again(self, code, details=""):
        if self._refused_shm(code, details):
            return True   # refused before any gradient was accumulated: the same call, inline
        if code is grpc.StatusCode.FAILED_PRECONDITION and RESEND_INPUTS_HINT in details and not self.with_inputs:
            self.with_inputs = True  # the expert lost the activations: send the inputs to recompute
            return True
        return False   # a step conflict or overflowing gradients would be refused again


class StepCall(Call):
    """GradNorm or ApplyStep: the end of a step on the one replica that holds its gradients. Both may be
    sent again there: GradNorm only reads, and an expert applies (or skips) a (session, step) once, so a
    second ApplyStep after a first that did arrive finds no gradients and changes nothing. A failure that
    may pass (the connection, a deadline, a full queue) gets up to `retries` more attempts within the
    budget, which is split evenly between the attempts: a first attempt that hangs leaves time for the
    next. Without this, one lost ApplyStep left that replica a step behind the others for good."""

    RETRY_ON = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.RESOURCE_EXHAUSTED})
    # The retry goes to the same endpoint. gRPC fails a reset connection's calls before its channel
    # stops picking that connection, so an attempt sent at once can land on the dying connection and
    # fail too ("Stream removed: Broken pipe"; seen in CI). A short pause lets the channel move on.
    RETRY_PAUSE_S = 0.05

    def __init__(self, uid: str, endpoint: str, step: int, session_id: str, retries: int, budget_s: float | None):
        """`budget_s`: what all attempts may take together (None: each may take what is left)."""
        super().__init__(uid, 0, endpoint)
        self.step, self.session_id, self.retries = step, session_id, retries
        self.attempt_budget_s = None if budget_s is None else budget_s / (retries + 1)
        self.retry_pause_s = self.RETRY_PAUSE_S if budget_s is None else min(self.RETRY_PAUSE_S,
                                                                              self.attempt_budget_s / 10)

    def target(self, replicas):
        return self.endpoint if self.attempts <= self.retries else None

    def again(self, code, details=""):
        return code in self.RETRY_ON and self.attempts <= self.retries

    @property
    def wait_for_ready(self) -> bool:
        """A second attempt waits for the channel to reconnect (within its budget) instead of failing at
        once while gRPC backs off after the first one's broken connection."""
        return self.attempts > 1


class GradNormCall(StepCall):
    rpc = "GradNorm"

    def __init__(self, uid: str, endpoint: str, step: int, session_id: str, retries: int = 0,
                 budget_s: float | None = None):
        super().__init__(uid, endpoint, step, session_id, retries, budget_s)
        self.sq_norm = 0.0
        self.usable = False

    def send(self, client, timeout_s, metadata):
        return client.grad_norm(self.uid, step=self.step, timeout_s=timeout_s, session_id=self.session_id,
                                metadata=metadata, wait_for_ready=self.wait_for_ready)

    def accept(self, response):
        sq = float(response.sq_norm)
        if sq < 0:
            raise TensorError(grpc.StatusCode.INTERNAL, f"sq_norm {sq} is negative")
        # Inf/NaN: real overflow of this replica's gradients (not a fault of the endpoint). It must not
        # stall everyone's step: this replica's step is skipped (RemoteExpertGroup._end_step), the
        # others and the trunk go on.
        self.usable = math.isfinite(sq)
        self.sq_norm = sq if self.usable else 0.0


class ApplyStepCall(StepCall):
    rpc = "ApplyStep"

    def __init__(self, uid: str, endpoint: str, step: int, lr: float, grad_scale: float,
                 settings: OptimizerSettings, session_id: str, skip: bool = False, retries: int = 0,
                 budget_s: float | None = None):
        super().__init__(uid, endpoint, step, session_id, retries, budget_s)
        self.lr, self.grad_scale, self.settings, self.skip = lr, grad_scale, settings, skip

    def send(self, client, timeout_s, metadata):
        s = self.settings
        return client.apply_step(self.uid, step=self.step, lr=self.lr, grad_scale=self.grad_scale,
                                 weight_decay=s.weight_decay, beta1=s.beta1, beta2=s.beta2, eps=s.eps,
                                 timeout_s=timeout_s, session_id=self.session_id, skip=self.skip,
                                 metadata=metadata, wait_for_ready=self.wait_for_ready)



def views_message(msg: tensor_pb2.Tensor) -> bool:
    """Whether `decode(msg)` returns a view of the message's own bytes (fp32 inline) rather than a tensor
    with memory of its own (copied out of shared memory, or converted from another wire dtype)."""
    return not msg.HasField("shm") and msg.dtype == tensor_pb2.DTYPE_FLOAT32
