"""The experts of one MoE layer behind gRPC: `RemoteExpertGroup` implements `moe.boundary.ExpertGroup`.

    replicas = ReplicaSet(ExpertRegistry(redis.Redis.from_url(url)))
    group = RemoteExpertGroup(layer=0, n_experts=8, dim=256, replicas=replicas, timeout_s=2.0)
    outputs = group.run({3: x3, 5: x5})      # {3: y3, 5: None} when expert 5 is down

One `run` sends one Forward per expert that has tokens, all in flight at once (futures of
the pool's call threads, or small moe-frames calls sent and read on this thread, see
`subnet.expert_client` and `call_inbox`), and waits at most `timeout_s` for the lot:
- a call that fails fast (service gone, overloaded, bad answer) is sent again to another
  replica of the same expert, up to `retries` times, within what is left of the budget;
- a call that misses the deadline has used the budget: it is masked, never waited for;
- a masked expert comes back as None, is counted (`router_masked_calls`) and logged with
  its uid, endpoint and status, and its endpoint is skipped for a short while.

Training (grad enabled and some input requires grad): the outputs hang off one
`torch.autograd.Function`, whose backward sends every expert's `grad_output` at once to
the replica that served its Forward (it holds the activations; on a FAILED_PRECONDITION that
says they are gone, RESEND_INPUTS_HINT, the inputs go along so it recomputes them). Backward is
never sent twice on a transport error: it accumulates gradients on the server, so a duplicate
would double them. A failed Backward gives zero gradient to that expert's tokens and is
counted as masked; training goes on. `begin_step`, `external_grad_sq_norm` and `apply_external_step` (or
`skip_external_step`, when the global norm is not finite) then drive the experts' own
optimizers (GradNorm, ApplyStep) for the replicas that received a Backward this step; a
replica whose GradNorm fails or is not finite is left out of the norm and skips its own step,
so one miner's overflow (or a hostile answer) never stalls the others'. With
`apply_on_backward` (asynchronous training, ROUTER_TRAINING=async) each Backward carries the step's
AdamW settings and the expert steps on that call's gradients at once; GradNorm and ApplyStep are
not sent.

Gradients travel in `grad_wire_dtype(wire_dtype)`: fp16's range ends near 6e-8, where
gradients often are, so with an fp16 activation wire they go as bf16 (the expert answers
grad_inputs in the dtype of grad_outputs); the expert must accept bf16 then.

This class does not gate, sort or combine tokens (the MoE layer does), and does not
choose replicas itself (`ReplicaSet` does). The calls it sends, one class per RPC, are in
`services.router.expert_calls`; this module sends them, retries and masks them, and drives steps.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import grpc
import torch

from moe.boundary import ExpertGroup, OptimizerSettings
from moe.experts import expert_uid
from services.router.call_inbox import CallInbox
from services.router.expert_calls import (
    ApplyStepCall,
    BackwardCall,
    Call,
    ForwardCall,
    ForwardManyCall,
    GradNormCall,
    grad_wire_dtype,
)
from services.router.metrics import RouterMetrics
from services.router.replicas import ReplicaSet
from services.router.tracing import ExpertCallTracer
from subnet.auth.client import AnswerRefused
from subnet.expert_client import ExpertClientPool, InlineCall
from subnet.tensor_codec import WIRE_DTYPES, TensorError
from subnet.wire.v1 import expert_pb2

log = logging.getLogger(__name__)

MIN_ATTEMPT_S = 0.005  # a retry with less budget left than this cannot succeed: mask instead
GRACE_S = 0.5          # gRPC enforces the deadline itself; this only guards against a lost callback
# Statuses that say nothing bad about the endpoint, so it is not made suspect.
# Answers that say nothing bad about the replica: the request's fault, or overload (the replica
# is healthy but busy; suspecting it would mask experts exactly when load is high).
_ENDPOINT_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class _Attempt:
    call: Call
    endpoint: str
    future: Future | None = None


@dataclass
class _TrainingPass:
    """What backward needs from one training `run`: the Forward calls and the input layouts."""

    group: RemoteExpertGroup
    forwards: list[ForwardCall]


class _RemoteExperts(torch.autograd.Function):
    """Links the remote outputs to the inputs: backward = one Backward RPC per expert, all at once."""

    @staticmethod
    def forward(ctx, training_pass: _TrainingPass, *inputs):
        ctx.training_pass = training_pass
        ctx.layouts = [(x.dtype, x.device) for x in inputs]
        ctx.set_materialize_grads(False)  # an unused output gets no Backward call
        outputs = tuple(forward.owned_outputs(x) for x, forward in zip(inputs, training_pass.forwards))
        for forward in training_pass.forwards:
            forward.outputs = None   # may be the very tensor returned: no reference cycle through ctx
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        training_pass = ctx.training_pass
        grads = training_pass.group._backward(training_pass.forwards, grad_outputs)
        out = []
        for grad, (dtype, device), needed in zip(grads, ctx.layouts, ctx.needs_input_grad[1:]):
            keep = needed and grad is not None
            out.append(grad.to(dtype=dtype, device=device) if keep else None)   # a tensor of its own (_backward)
        return (None, *out)


class _Coverage:
    """hivemind's straggler rule: the layer has enough once every token has answers from `k_min`
    of its experts (from all it has, when capacity left it fewer)."""

    def __init__(self, forwards: Mapping[int, ForwardCall], token_ids: Mapping[int, torch.Tensor], k_min: int):
        self.forwards, self.token_ids = forwards, token_ids
        self.n_tokens = int(max(int(ids.max()) for ids in token_ids.values())) + 1
        self.need = torch.bincount(torch.cat(list(token_ids.values())), minlength=self.n_tokens).clamp_max(k_min)

    def __call__(self) -> bool:
        answered = [self.token_ids[i] for i, f in self.forwards.items() if f.answered]
        if not answered:
            return False
        have = torch.bincount(torch.cat(answered), minlength=self.n_tokens)
        return bool((have >= self.need).all())


class RemoteExpertGroup(ExpertGroup):
    """The routed experts of MoE layer `layer`, reached over gRPC. Reusable across steps; thread-safe
    for one `run` at a time per group (the MoE layer calls it synchronously)."""

    def __init__(self, layer: int, n_experts: int, dim: int, replicas: ReplicaSet, wire_dtype: str = "fp32",
                 timeout_s: float = 5.0, retries: int = 1, metrics: RouterMetrics | None = None, *,
                 clients: ExpertClientPool | None = None, tracer: ExpertCallTracer | None = None,
                 step_timeout_s: float | None = None, forward_many_max_tokens: int = 0,
                 straggler_ms: float = 0.0, k_min: int = 1, apply_on_backward: bool = False):
        """`clients`: the router's shared channel pool (one per process; a private one if None).
        `timeout_s`: budget of one run (all Forward calls) and of one backward (all Backward calls).
        `step_timeout_s`: budget of GradNorm and ApplyStep (default `timeout_s`).
        `forward_many_max_tokens`: serving Forwards to one endpoint that hold at most this many tokens
        together go as one ForwardMany call (0 = never; see `_serve`).
        `straggler_ms` > 0: once every token has answers from `k_min` of its experts (the MoE layer
        passes `token_ids`), the Forwards still out get this much longer, then they are masked
        (hivemind's policy; 0 = wait for every expert up to `timeout_s`).
        `apply_on_backward`: asynchronous training (hivemind style): each Backward carries the step's
        AdamW settings (from `step_settings`) and the expert applies them to that call's gradients at once;
        there is no GradNorm or ApplyStep, so the trainer's global norm covers the trunk only and each
        call's expert gradients are clipped to the same norm on their own."""
        if n_experts <= 0 or dim <= 0:
            raise ValueError(f"n_experts and dim must be positive, got {n_experts}, {dim}")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        if straggler_ms < 0 or k_min < 1:
            raise ValueError(f"straggler_ms must be >= 0 and k_min >= 1, got {straggler_ms}, {k_min}")
        if timeout_s <= 0 or retries < 0:
            raise ValueError(f"timeout_s must be > 0 and retries >= 0, got {timeout_s}, {retries}")
        self.layer, self.n_experts, self.dim = layer, n_experts, dim
        self._layer_label = str(layer)   # the metrics label
        self.replicas = replicas
        self.wire_dtype = wire_dtype
        self.grad_wire_dtype = grad_wire_dtype(wire_dtype)
        self.timeout_s = timeout_s
        self.step_timeout_s = step_timeout_s if step_timeout_s is not None else timeout_s
        self.retries = retries
        self.forward_many_max_tokens = forward_many_max_tokens
        self.straggler_s, self.k_min = straggler_ms / 1000, k_min
        self._no_forward_many: set[str] = set()   # endpoints that answered UNIMPLEMENTED (older services)
        self.metrics = metrics if metrics is not None else RouterMetrics()
        self.tracer = tracer if tracer is not None else ExpertCallTracer()
        self._owns_clients = clients is None
        self.clients = clients if clients is not None else ExpertClientPool()
        # One training session per group object: experts accumulate gradients under (session, step),
        # so a router restarted after a crash (a new session, steps from 0 again) is not refused.
        self.session_id = uuid.uuid4().hex[:12]
        self._call_numbers = itertools.count()
        self._step = 0
        self._lock = threading.Lock()
        self._stepped: set[tuple[str, str]] = set()  # (uid, endpoint) that received Backward this step
        self.apply_on_backward = apply_on_backward
        self._apply_now: expert_pb2.ApplyNow | None = None   # this step's, in asynchronous training
        self._unnormed: set[tuple[str, str]] = set()  # of those, the ones without a usable GradNorm

    # ---- ExpertGroup -------------------------------------------------------------------------

    streams_outputs = True

    def run(self, batches: Mapping[int, torch.Tensor],
            token_ids: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor | None]:
        return self.run_meanwhile(batches, token_ids, None)

    def run_meanwhile(self, batches: Mapping[int, torch.Tensor], token_ids: Mapping[int, torch.Tensor] | None,
                      meanwhile: Callable[[], None] | None) -> dict[int, torch.Tensor | None]:
        """`run`; `meanwhile()` is called once the first calls are sent, before their answers are awaited
        (the MoE layer then computes its routing losses and shared experts during the round trip)."""
        training = torch.is_grad_enabled() and any(x.requires_grad for x in batches.values())
        forwards = self._forwards(batches, token_ids, training, meanwhile=meanwhile)
        result: dict[int, torch.Tensor | None] = {i: None for i in batches}
        served = [i for i in batches if forwards[i].answered]
        if training and served:
            training_pass = _TrainingPass(self, [forwards[i] for i in served])
            outputs = _RemoteExperts.apply(training_pass, *(batches[i] for i in served))
            result.update(zip(served, outputs))
        else:
            for i in served:
                result[i] = forwards[i].owned_outputs(batches[i])
        return result

    def run_streaming(self, batches: Mapping[int, torch.Tensor], token_ids: Mapping[int, torch.Tensor] | None,
                      on_output: Callable[[int, torch.Tensor], None],
                      meanwhile: Callable[[], None] | None = None) -> tuple[int, ...]:
        """Each answer goes to `on_output` as it is accepted, on this thread, while the other calls are
        still out. Inference only: no autograd graph is built. An answer in shared memory is handed over
        as a copy of its own, never read in place: the expert shares that region and could rewrite it
        after its answer passed the finiteness check."""
        def hand_over(forward: ForwardCall) -> None:
            on_output(forward.expert, forward.outputs)
            forward.outputs = None   # combined: nothing keeps it

        forwards = self._forwards(batches, token_ids, training=False, on_answer=hand_over, meanwhile=meanwhile)
        return tuple(sorted(i for i, forward in forwards.items() if not forward.answered))

    def _forwards(self, batches: Mapping[int, torch.Tensor], token_ids: Mapping[int, torch.Tensor] | None,
                  training: bool, on_answer: Callable[[ForwardCall], None] | None = None,
                  meanwhile: Callable[[], None] | None = None) -> dict[int, ForwardCall]:
        """The Forward calls of one `run`, sent and collected (each `answered`, or given up); `on_answer`:
        called with each Forward as its answer is accepted; `meanwhile`: see `run_meanwhile` (called at
        most once)."""
        for i, x in batches.items():
            if not 0 <= i < self.n_experts:
                raise ValueError(f"expert index {i} out of range for layer {self.layer} "
                                 f"({self.n_experts} experts)")
            if x.dim() != 2 or x.shape[1] != self.dim or x.shape[0] < 1:
                raise ValueError(f"expert {i}: expected (tokens >= 1, {self.dim}), got {tuple(x.shape)}")
        forwards = {i: ForwardCall(expert_uid(self.layer, i), x.detach(), self.wire_dtype, self.dim,
                                f"{self.session_id}:{next(self._call_numbers)}", self._step, training,
                                self.retries, expert=i, on_answer=on_answer)
                    for i, x in batches.items()}
        covered = _Coverage(forwards, token_ids, self.k_min) if self.straggler_s and token_ids else None
        if training or not self.forward_many_max_tokens:
            self._gather(list(forwards.values()), self.timeout_s, covered=covered, meanwhile=meanwhile)
        else:
            self._serve(list(forwards.values()), covered, meanwhile)
        self.metrics.expert_tokens_of(self._layer_label).inc(sum(x.shape[0] for x in batches.values()))
        return forwards

    def begin_step(self, step: int) -> None:
        with self._lock:
            self._step = step
            self._stepped.clear()
            self._unnormed.clear()

    def step_settings(self, lr: float, settings: OptimizerSettings, grad_clip: float) -> None:
        if self.apply_on_backward:
            with self._lock:
                self._apply_now = expert_pb2.ApplyNow(lr=lr, weight_decay=settings.weight_decay, beta1=settings.beta1,
                                                      beta2=settings.beta2, eps=settings.eps, max_grad_norm=grad_clip)

    def external_grad_sq_norm(self) -> float:
        """The squared norm over the replicas that answered with a usable one; the others (failed,
        timed out, not finite) are left out of it and get skip=true at the end of the step, since the
        clip factor never saw their gradients."""
        calls = [GradNormCall(uid, endpoint, self._step, self.session_id, self.retries, self.step_timeout_s)
                 for uid, endpoint in self._participants()]
        self._gather(calls, self.step_timeout_s)
        for c in calls:
            if c.failed is None and not c.usable:
                self.metrics.masked_calls.labels(str(self.layer), c.uid, "gradnorm", "not_finite").inc()
                log.warning("layer %d expert %s at %s: gradient norm is not finite; that replica skips step %d",
                            self.layer, c.uid, c.endpoint, self._step)
        with self._lock:
            self._unnormed = {(c.uid, c.endpoint) for c in calls if c.failed is not None or not c.usable}
        return sum(c.sq_norm for c in calls if c.failed is None and c.usable)

    def apply_external_step(self, lr: float, grad_scale: float, settings: OptimizerSettings) -> None:
        self._end_step(lr, grad_scale, settings, skip=False)

    def skip_external_step(self) -> None:
        self._end_step(0.0, 0.0, OptimizerSettings(), skip=True)

    def _end_step(self, lr: float, grad_scale: float, settings: OptimizerSettings, skip: bool) -> None:
        with self._lock:
            unnormed = set(self._unnormed)
        calls = [ApplyStepCall(uid, endpoint, self._step, lr, grad_scale, settings, self.session_id,
                            skip or (uid, endpoint) in unnormed, self.retries, self.step_timeout_s)
                 for uid, endpoint in self._participants()]
        self._gather(calls, self.step_timeout_s)
        with self._lock:
            self._stepped.clear()  # applied: a second call in the same step must not step again

    def close(self) -> None:
        """Close the channel pool if this group created it."""
        if self._owns_clients:
            self.clients.close()

    # ---- internals ---------------------------------------------------------------------------

    def _participants(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._stepped)

    def _backward(self, forwards: Sequence[ForwardCall], grad_outputs) -> list[torch.Tensor | None]:
        """Backward for one training pass; zero gradient for an expert whose call fails."""
        with self._lock:
            apply_now = self._apply_now
        if self.apply_on_backward and apply_now is None:
            raise RuntimeError(f"layer {self.layer}: asynchronous training needs the step's learning rate before "
                               f"backward: call step_settings(lr, settings, grad_clip) after begin_step")
        calls = [None if g is None else BackwardCall(f, g.detach(), self.grad_wire_dtype, self.session_id, apply_now)
                 for f, g in zip(forwards, grad_outputs)]
        self._gather([c for c in calls if c is not None], self.timeout_s)
        grads = []
        for call, forward in zip(calls, forwards):
            if call is None:
                grads.append(None)
            elif call.grad_inputs is None:
                grads.append(torch.zeros(forward.tokens, self.dim))
            else:
                if apply_now is None:   # synchronous: this replica gets GradNorm and ApplyStep at the end
                    with self._lock:
                        self._stepped.add((call.uid, call.endpoint))
                grads.append(call.grad_inputs)
        return grads

    def _serve(self, forwards: list[ForwardCall], covered: Callable[[], bool] | None = None,
               meanwhile: Callable[[], None] | None = None) -> None:
        """Serving Forwards: those bound for the same endpoint go as one ForwardMany when they are
        small together (a decode step sends a few tokens to most experts of a layer: per call, not
        per token, is what costs). A failed ForwardMany's Forwards are sent again one by one, within
        what is left of the budget, to other replicas as a failed Forward would be (or to the same
        endpoint, when it only lacks ForwardMany)."""
        deadline = time.monotonic() + self.timeout_s
        by_endpoint: dict[str, list[ForwardCall]] = {}
        calls: list[Call] = []
        for forward in forwards:
            endpoint = forward.target(self.replicas)
            with self._lock:
                known_old = endpoint in self._no_forward_many
            if endpoint is None or known_old:
                calls.append(forward)   # chooses again when launched (and gives up there if nowhere)
            else:
                by_endpoint.setdefault(endpoint, []).append(forward)
        for endpoint, group in by_endpoint.items():
            if len(group) == 1 or sum(f.tokens for f in group) > self.forward_many_max_tokens:
                for forward in group:
                    forward.first = endpoint
                calls.extend(group)
            else:
                calls.append(ForwardManyCall(group, endpoint, self.wire_dtype, self.dim, self._step))
        self._gather(calls, self.timeout_s, phase="Forward", covered=covered, meanwhile=meanwhile)
        again: list[ForwardCall] = []
        for call in calls:
            if not isinstance(call, ForwardManyCall) or call.failed is None:
                continue
            if call.failed[0] in ("straggler", "deadline_exceeded"):   # out of time: no second try
                for forward in call.forwards:
                    self._give_up(forward, *call.failed)
                continue
            if call.failed[0] == "unimplemented":   # the reason is the status code's name
                with self._lock:
                    self._no_forward_many.add(call.endpoint)
            elif self.retries == 0:
                for forward in call.forwards:
                    self._give_up(forward, *call.failed)
                continue
            else:
                for forward in call.forwards:
                    forward.tried.add(call.endpoint)
                    forward.attempts = 1   # the ForwardMany was their first attempt
            again.extend(call.forwards)
        remaining = deadline - time.monotonic()
        if again and remaining >= MIN_ATTEMPT_S:
            self._gather(again, remaining, covered=covered)
        else:
            for forward in again:
                self._give_up(forward, "deadline_exceeded", "no time left to send it again on its own")

    def _gather(self, calls: Sequence[Call], timeout_s: float, phase: str | None = None,
                covered: Callable[[], bool] | None = None, meanwhile: Callable[[], None] | None = None) -> None:
        """Send every call at once and collect them, under one `moe.layer/<phase>` span (default: the
        calls' RPC) whose children are the call spans (and, through the `traceparent` they send, the
        experts' server spans)."""
        if not calls:
            return
        with self.tracer.layer(self.layer, phase or calls[0].rpc, len(calls)) as span:
            self._send_and_collect(calls, timeout_s, covered, meanwhile)
            failed = sorted(f"{c.uid}:{c.failed[0]}" for c in calls if c.failed is not None)
            if failed:
                span.set_attribute("moe.given_up", failed)

    def _send_and_collect(self, calls: Sequence[Call], timeout_s: float, covered: Callable[[], bool] | None = None,
                          meanwhile: Callable[[], None] | None = None) -> None:
        """Retries and give-ups happen here. Returns by the deadline (+ GRACE_S at worst); afterwards
        each call has succeeded or has `failed` set. `covered()` True (checked after each answer):
        what is still out gets `straggler_s` more, then is given up as a straggler. `meanwhile()`: called
        once every call is sent, before any answer is awaited."""
        done = CallInbox()
        try:
            self._collect(calls, timeout_s, covered, done, meanwhile)
        finally:
            done.close()

    def _collect(self, calls: Sequence[Call], timeout_s: float, covered: Callable[[], bool] | None,
                 done: CallInbox, meanwhile: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        cut: float | None = None   # the straggler deadline, once covered
        in_flight: set[int] = set()
        attempts: dict[int, _Attempt] = {}

        def abandon(key: int) -> None:
            """Stop waiting for an attempt whose answer nobody will read."""
            done.forget(attempts[key].future)   # an inline call's socket is closed by cancel()
            attempts[key].future.cancel()
            attempts[key].call.settle(False)

        def launch(call: Call) -> bool:
            endpoint = call.target(self.replicas)
            remaining = deadline - time.monotonic()
            if endpoint is None or remaining < MIN_ATTEMPT_S:
                return False
            if call.attempt_budget_s is not None:
                remaining = min(remaining, call.attempt_budget_s)
            attempt = _Attempt(call, endpoint)
            span, metadata = self.tracer.start(call.rpc, layer=self.layer, uid=call.uid, endpoint=endpoint,
                                               tokens=call.tokens or None)
            call.endpoint = endpoint
            call.attempts += 1
            started = time.perf_counter()
            self.replicas.begin_call(endpoint, call.tokens)
            try:
                attempt.future = call.send(self.clients.get(endpoint), remaining, metadata)
            except Exception:  # e.g. the pool was closed: a lifecycle bug, raised, but counters stay right
                self.replicas.end_call(endpoint, call.tokens)
                self.tracer.end(span, grpc.StatusCode.UNKNOWN, "not sent")
                raise
            span.set_attribute("rpc.system", getattr(attempt.future, "rpc_system", "grpc"))   # before it can end
            key = id(attempt)
            attempts[key] = attempt
            in_flight.add(key)
            attempt.future.add_done_callback(lambda f: self._finished(f, attempt, key, span, started, done))
            if isinstance(attempt.future, InlineCall) and not attempt.future.done():
                done.watch(attempt.future)   # this thread reads its answer: no call thread involved
            return True

        for call in calls:
            if not launch(call):
                self._give_up(call, "no_replica", "no replica to call (none registered, or all failed "
                                                  "within the suspect cooldown)")
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:   # the caller's work failed: nobody will read these answers
                for key in list(in_flight):
                    abandon(key)
                raise
        while in_flight:
            limit = cut if cut is not None else deadline + GRACE_S
            try:
                key, response, code, details, refused = done.get(timeout=max(0.0, limit - time.monotonic()))
            except queue.Empty:
                reason, why = ("straggler", f"every token had {self.k_min} answer(s); waited "
                                            f"{self.straggler_s * 1e3:.0f} ms more") if cut is not None else \
                              ("deadline_exceeded", "no answer by the deadline")
                for key in list(in_flight):
                    abandon(key)
                    self._give_up(attempts[key].call, reason, why)
                break
            in_flight.discard(key)
            call = attempts[key].call
            reason = refused or code.name.lower()   # an answer refused here: why (subnet.auth.client.AnswerRefused)
            if code is grpc.StatusCode.OK:
                try:
                    call.accept(response)
                    call.hand_over()
                    call.settle(True)
                    if attempts[key].endpoint in call.failed_at:   # answered where it had failed
                        for uid in call.uids:
                            self.replicas.mark_answered(attempts[key].endpoint, uid)
                    if cut is None and covered is not None and in_flight and covered():
                        now = time.monotonic()
                        if now + self.straggler_s < deadline:
                            cut = deadline = now + self.straggler_s   # retries get no more than that either
                    continue
                except TensorError as e:  # a wrong answer is the replica's fault, like a crash
                    code, reason = grpc.StatusCode.INTERNAL, "bad_response"
                    details = f"unusable response: {e.message}"
            call.settle(False)
            endpoint = attempts[key].endpoint
            if (code not in _ENDPOINT_OK or reason == "bad_response") and call.blames_endpoint(code):
                call.failed_at.add(endpoint)
                for uid in call.uids:
                    self.replicas.mark_failed(endpoint, uid)
            if call.again(code, details):
                pause = min(call.retry_pause_s, deadline - time.monotonic() - MIN_ATTEMPT_S)
                if pause > 0:
                    time.sleep(pause)   # a failure path only; answers meanwhile wait in `done`
                if launch(call):
                    self.metrics.expert_retries.labels(str(self.layer), call.rpc.lower()).inc()
                    log.info("layer %d expert %s: %s at %s failed (%s: %s); sent again to %s",
                             self.layer, call.uid, call.rpc, endpoint, code.name, details, call.endpoint)
                    continue
            call.endpoint = endpoint
            self._give_up(call, reason, details)

    def _finished(self, future: Future, attempt: _Attempt, key: int, span, started: float,
                  done: CallInbox) -> None:
        """A call thread (or the waiting one, for a call cancelled before it started): book-keeping
        of one attempt, then hand it to the waiting thread."""
        elapsed = time.perf_counter() - started
        self.replicas.end_call(attempt.endpoint, attempt.call.tokens)
        response, details, refused = None, "", None
        if future.cancelled():
            code = grpc.StatusCode.CANCELLED
        else:
            error = future.exception()
            if error is None:
                code, response = grpc.StatusCode.OK, future.result()
            elif isinstance(error, grpc.RpcError):
                code, details = error.code(), error.details() or ""
                refused = error.reason if isinstance(error, AnswerRefused) else None
            else:
                code, details = grpc.StatusCode.UNKNOWN, repr(error)
        rpc = attempt.call.rpc.lower()
        self.metrics.expert_call_seconds_of(self._layer_label, rpc).observe(elapsed)
        self.metrics.expert_calls_of(self._layer_label, rpc, code.name).inc()
        self.tracer.end(span, code, details)
        done.put((key, response, code, details, refused))

    def _give_up(self, call: Call, reason: str, details: str) -> None:
        call.failed = (reason, details)
        if isinstance(call, ForwardManyCall):   # not a mask: its Forwards are decided in `_serve`
            log.info("layer %d experts %s: ForwardMany at %s failed with %s: %s", self.layer, call.uid,
                     call.endpoint or "-", reason.upper(), details)
            return
        self.metrics.masked_calls.labels(str(self.layer), call.uid, call.rpc.lower(), reason).inc()
        consequence = {"Forward": "masked", "Backward": "zero gradient for its tokens"}.get(
            call.rpc, "skipped")
        # A straggler cut is the policy working (counted in the metric), not a fault to warn about.
        (log.info if reason == "straggler" else log.warning)(
            "layer %d expert %s %s: %s at %s gave up with %s: %s", self.layer, call.uid, consequence,
            call.rpc, call.endpoint or "-", reason.upper(), details)
