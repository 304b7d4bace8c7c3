"""The compute side of an expert service: SwiGLU modules, their AdamW state, the activations
kept between a training Forward and its Backward. No gRPC, no asyncio, no batching policy.

Not thread-safe by design: the service calls every method from one worker thread, which
also orders forwards, backwards and optimizer steps. (The activation cache alone is
locked, because the server's janitor sweeps it from another thread.)

Backward is written by hand instead of replaying autograd: the Forward keeps x, a = x W1^T
and b = x W3^T, so the Backward does no forward matmul again and holds no autograd graph
(which would pin every intermediate of every call until its Backward).

    y  = W2 h,   h = silu(a) * b
    dW2 = g^T h                 dh = g W2
    db  = dh * silu(a)          da = dh * b * silu'(a),  silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)
    dW1 = da^T x                dW3 = db^T x             dx = da W1 + db W3
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moe.experts import SwiGLU
from subnet.expert_weights import experts_from_states
from subnet.optimizer_moments import MomentsError, adamw_moments, restore_adamw_moments
from subnet.tensor_codec import RESEND_INPUTS_HINT, all_finite


class ExpertError(Exception):
    """Base of the errors a request can cause; the servicer maps each class to a status code."""


class UnknownExpert(ExpertError):
    pass


class ActivationsMissing(ExpertError):
    pass


class StepConflict(ExpertError):
    pass


class DuplicateBackward(ExpertError):
    pass


class BadRequest(ExpertError):
    pass


@dataclass(frozen=True)
class StepNow:
    """The optimizer step of an asynchronous Backward (moe.v1.ApplyNow), already checked."""

    lr: float
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 0.0   # 0 = no clipping


class NonFiniteGradients(ExpertError):
    """The step's gradients hold NaN or Inf: they were discarded, nothing was applied."""


@dataclass
class _Saved:
    x: torch.Tensor   # (N, dim)
    a: torch.Tensor   # (N, inter)  x W1^T
    b: torch.Tensor   # (N, inter)  x W3^T
    nbytes: int
    created: float
    version: int = 0   # the expert's version when the Forward ran (asynchronous staleness)


class ActivationCache:
    """Activations of training Forwards, keyed by (uid, call_id), until their Backward.

    Bounded twice: entries older than `ttl_s` expire, and when the total would pass
    `max_bytes` the oldest entries are evicted. So a router that dies mid-step costs at
    most `max_bytes`, and nothing after `ttl_s`. An entry larger than `max_bytes` is not
    kept at all (its Backward then needs the inputs resent).
    """

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self.nbytes = 0
        self.evicted = 0
        self.expired = 0
        self._entries: OrderedDict[tuple[str, str], _Saved] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: tuple[str, str], x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, version: int = 0) -> bool:
        nbytes = sum(t.numel() * t.element_size() for t in (x, a, b))
        with self._lock:
            self._sweep_locked()
            self._remove_locked(key)
            if nbytes > self.max_bytes:
                return False
            while self.nbytes + nbytes > self.max_bytes:
                self._remove_locked(next(iter(self._entries)))
                self.evicted += 1
            self._entries[key] = _Saved(x, a, b, nbytes, self.clock(), version)
            self.nbytes += nbytes
            return True

    def peek(self, key: tuple[str, str]) -> _Saved | None:
        with self._lock:
            self._sweep_locked()
            return self._entries.get(key)

    def pop(self, key: tuple[str, str]) -> _Saved | None:
        with self._lock:
            return self._remove_locked(key)

    def sweep(self) -> int:
        """Drop expired entries now; returns how many. The server calls it periodically so an
        idle service frees memory too."""
        with self._lock:
            return self._sweep_locked()

    def _sweep_locked(self) -> int:
        cutoff = self.clock() - self.ttl_s
        n = 0
        while self._entries:
            key, saved = next(iter(self._entries.items()))
            if saved.created > cutoff:
                break
            self._remove_locked(key)
            n += 1
        self.expired += n
        return n

    def _remove_locked(self, key: tuple[str, str]) -> _Saved | None:
        saved = self._entries.pop(key, None)
        if saved is not None:
            self.nbytes -= saved.nbytes
        return saved


@dataclass
class _Expert:
    module: SwiGLU
    optimizer: torch.optim.AdamW
    version: int = 0                      # optimizer steps applied
    grad_session: str = ""                # the training session the accumulated gradients belong to
    grad_step: int | None = None          # ... and the step
    grad_calls: set[str] = field(default_factory=set)  # call_ids that contributed to them
    applied: tuple[str, int] | None = None  # (session, step) of the last optimizer step applied


class ExpertBackend:
    """Owns the hosted experts and their optimizers; forward, backward, grad norm, step."""

    def __init__(self, experts: Mapping[str, SwiGLU], device: str | torch.device = "cpu",
                 activation_ttl_s: float = 60.0, activation_cache_mb: float = 512.0,
                 clock: Callable[[], float] = time.monotonic, *, lazy: bool = False,
                 answer: Callable[[torch.Tensor], torch.Tensor] | None = None, max_staleness: int = 16,
                 on_stale: Callable[[str], None] = lambda uid: None):
        """`max_staleness`: an asynchronous Backward (`apply_now`) updates its expert only when at most this
        many updates came between its Forward and it; a staler one answers its input gradient and skips its
        update, `on_stale(uid)` (a metric). Gradients computed on activations of weights that many updates
        old point elsewhere than the current weights' (hivemind bounds such delay the same way).
        `lazy` and `answer` exist for the adversarial test miners only (services/expert/adversary.py):
        `lazy` acknowledges ApplyStep without stepping; `answer` replaces every Forward output."""
        if not experts:
            raise ValueError("an expert backend needs at least one expert")
        shapes = {(m.dim, m.inter_dim) for m in experts.values()}
        if len(shapes) != 1:
            raise ValueError(f"all hosted experts must share (dim, inter_dim); got {sorted(shapes)}")
        self.dim, self.inter_dim = shapes.pop()
        self.device = torch.device(device)
        self._experts: dict[str, _Expert] = {}
        for uid, module in experts.items():
            module = module.to(self.device, torch.float32)
            module.requires_grad_(False)  # gradients are computed by hand, never by autograd
            # Hyperparameters are placeholders: every ApplyStep sets them from the request.
            optimizer = torch.optim.AdamW(module.parameters(), lr=0.0)
            self._experts[uid] = _Expert(module, optimizer)
        self.lazy, self.answer = lazy, answer
        if max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness} must be >= 0")
        self.max_staleness, self._on_stale = max_staleness, on_stale
        self.cache = ActivationCache(int(activation_cache_mb * 1024 * 1024), activation_ttl_s, clock)
        # Sessions replaced by a newer one: a late Backward of a crashed router must not wipe the
        # new session's gradients. Bounded: only the most recent ones matter.
        self._retired_sessions: OrderedDict[str, None] = OrderedDict()
        # (round, {uid: SwiGLU on the CPU}) this service committed last: see keep_committed.
        self._committed: tuple[int, Mapping[str, SwiGLU]] | None = None

    @property
    def uids(self) -> list[str]:
        return list(self._experts)

    def module(self, uid: str) -> SwiGLU:
        return self._get(uid).module

    def version(self, uid: str) -> int:
        return self._get(uid).version

    def _get(self, uid: str) -> _Expert:
        try:
            return self._experts[uid]
        except KeyError:
            raise UnknownExpert(f"expert {uid!r} is not hosted here; hosted: {', '.join(self._experts)}") from None

    # -- forward ----------------------------------------------------------------------------

    def forward(self, uid: str, x: torch.Tensor, call_id: str | None = None) -> torch.Tensor:
        """One request; `call_id` set = training (keep activations for its Backward)."""
        return self.forward_batch(uid, [x], [call_id])[0]

    def forward_batch(self, uid: str, xs: Sequence[torch.Tensor],
                      call_ids: Sequence[str | None]) -> list[torch.Tensor]:
        """Several requests for one expert as one computation; outputs split back, on the CPU."""
        e = self._get(uid)
        m = e.module
        sizes = [x.shape[0] for x in xs]
        x = (xs[0] if len(xs) == 1 else torch.cat(list(xs))).to(self.device, torch.float32)  # (N, dim)
        with torch.no_grad():
            a = F.linear(x, m.w1.weight)                  # (N, inter)
            b = F.linear(x, m.w3.weight)                  # (N, inter)
            y = F.linear(F.silu(a) * b, m.w2.weight)      # (N, dim), the same ops as SwiGLU.forward
        if any(c is not None for c in call_ids):
            start = 0
            for n, x_i, call_id in zip(sizes, xs, call_ids):
                if call_id is not None:
                    if len(xs) == 1:
                        self.cache.put((uid, call_id), x, a, b, e.version)
                    else:  # copies, so one entry never pins the whole batch's memory
                        self.cache.put((uid, call_id), x_i.to(self.device, torch.float32),
                                       a[start:start + n].clone(), b[start:start + n].clone(), e.version)
                start += n
        y = y.cpu()
        if self.answer is not None:
            y = self.answer(y)
        return list(torch.split(y, sizes)) if len(xs) > 1 else [y]

    def keep_committed(self, round: int, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Keep the weights just published and committed for `round` (copies, on the CPU) until the
        next commitment replaces them, to answer a validator's probe for that round exactly
        (`forward_committed`): the live weights go on training meanwhile, and a probe answered
        from them would differ from the published ones by that training. Callable from any thread."""
        modules = experts_from_states(states, states, self.dim, self.inter_dim, source=f"round {round}'s weights")
        for module in modules.values():
            module.requires_grad_(False)
        self._committed = (round, modules)

    def forward_committed(self, uid: str, x: torch.Tensor, round: int) -> torch.Tensor | None:
        """`uid`'s outputs for `x` under the weights committed for `round`; None when this service does
        not hold them (another round, or nothing committed since it started)."""
        self._get(uid)   # UnknownExpert for an expert not hosted here
        committed = self._committed
        if committed is None or committed[0] != round or uid not in committed[1]:
            return None
        with torch.no_grad():
            y = committed[1][uid](x.to("cpu", torch.float32))
        return self.answer(y) if self.answer is not None else y

    # -- backward ---------------------------------------------------------------------------

    def backward(self, uid: str, call_id: str, step: int, grad_out: torch.Tensor,
                 inputs: torch.Tensor | None = None, session_id: str = "", apply_now: StepNow | None = None,
                 ) -> torch.Tensor:
        """grad w.r.t. the inputs of training Forward `call_id`; accumulates parameter grads
        under (`session_id`, `step`). A new session discards the gradients another session left
        (a router that crashed between Backward and ApplyStep and came back with a new session).
        With `apply_now` (asynchronous training) the call's parameter gradients are not accumulated:
        one AdamW step is taken on them alone, at once (`_step_now`), and any gradients a synchronous
        session is accumulating stay as they are; a Forward more than `max_staleness` updates old gets no
        step (its input gradient is answered all the same).
        Raises ActivationsMissing when the activations are gone and no `inputs` were given,
        StepConflict for a step older than the one being accumulated or a retired session,
        DuplicateBackward when `call_id` already contributed to this step, NonFiniteGradients when
        `apply_now` meets gradients that are not finite (nothing applied)."""
        e = self._get(uid)
        if session_id in self._retired_sessions:
            raise StepConflict(f"training session {session_id!r} was replaced by a newer one on expert {uid}; "
                               f"its late Backward is refused")
        same_session = e.grad_step is None or e.grad_session == session_id
        if apply_now is None:
            self._check_accumulation(e, uid, call_id, step, session_id, same_session)
        key = (uid, call_id)
        saved = self.cache.peek(key)
        n_rows = saved.x.shape[0] if saved is not None else (inputs.shape[0] if inputs is not None else None)
        if n_rows is None:
            raise ActivationsMissing(f"expert {uid} no longer holds the activations of call_id {call_id!r} "
                                     f"(expired or evicted); {RESEND_INPUTS_HINT} set to the "
                                     f"Forward's inputs")
        if grad_out.shape[0] != n_rows:
            raise BadRequest(f"grad_outputs has {grad_out.shape[0]} tokens but the Forward of call_id "
                             f"{call_id!r} had {n_rows}")
        if inputs is not None and inputs.shape[0] != n_rows:
            raise BadRequest(f"inputs has {inputs.shape[0]} tokens but the Forward of call_id {call_id!r} had "
                             f"{n_rows}; resend the Forward's inputs unchanged")
        m = e.module
        if saved is not None:
            self.cache.pop(key)
            x, a, b = saved.x, saved.a, saved.b
        else:  # recompute path: the router resent the inputs
            x = inputs.to(self.device, torch.float32)
            with torch.no_grad():
                a = F.linear(x, m.w1.weight)
                b = F.linear(x, m.w3.weight)
        if apply_now is None:
            if not same_session:  # a new session: the old one's gradients will never be applied
                self._retire(e.grad_session)
                self._clear_grads(e)
            if e.grad_step is None or step > e.grad_step:  # a new step; older grads are stale
                self._clear_grads(e)
                e.grad_step = step
                e.grad_session = session_id
        g = grad_out.to(self.device, torch.float32)             # (N, dim)
        with torch.no_grad():
            s = F.silu(a)                                       # (N, inter)
            dh = g @ m.w2.weight                                # (N, inter)
            db = dh * s
            # autograd's own kernel for silu's derivative: one pass over (N, inter) where the formula
            # spelled out took six (sigmoid, then products and sums); these element-wise steps went
            # from 17 to 10.6 ms at 512 tokens of the benchmark's layer, one thread. The same numbers
            # as in-process autograd, bit for bit (the spelled-out formula differed by 1e-6).
            da = torch.ops.aten.silu_backward(dh * b, a)
            grads = {m.w2.weight: g.t() @ (s * b),              # (dim, inter)
                     m.w1.weight: da.t() @ x,                   # (inter, dim)
                     m.w3.weight: db.t() @ x}
            dx = da @ m.w1.weight + db @ m.w3.weight            # (N, dim), before a step changes W1, W3
            if apply_now is not None:
                # Resent inputs are recomputed under the current weights: no delay to bound.
                if saved is not None and e.version - saved.version > self.max_staleness:
                    self._on_stale(uid)
                else:
                    self._step_now(e, uid, grads, apply_now)
                return dx.cpu()
            for p, d in grads.items():
                if p.grad is None:
                    p.grad = d
                else:
                    p.grad.add_(d)
        e.grad_calls.add(call_id)
        return dx.cpu()

    def _check_accumulation(self, e: _Expert, uid: str, call_id: str, step: int, session_id: str,
                            same_session: bool) -> None:
        """A synchronous Backward may add to (`session_id`, `step`): StepConflict or DuplicateBackward if not."""
        if e.applied is not None and e.applied[0] == session_id and step <= e.applied[1]:
            raise StepConflict(f"step {step} of this session was already applied (or skipped) on expert {uid} "
                               f"(last step {e.applied[1]}); a late Backward cannot change it")
        if same_session and e.grad_step is not None and step < e.grad_step:
            raise StepConflict(f"Backward for step {step} arrived while expert {uid} accumulates step "
                               f"{e.grad_step}; a step's gradients are discarded once a newer step starts")
        if same_session and e.grad_step == step and call_id in e.grad_calls:
            raise DuplicateBackward(f"call_id {call_id!r} already contributed gradients to step {step} "
                                    f"of expert {uid}; a Forward is backpropagated once")

    def _step_now(self, e: _Expert, uid: str, grads: dict[torch.nn.Parameter, torch.Tensor], s: StepNow) -> None:
        """One AdamW step on one call's gradients (asynchronous training): clipped to `s.max_grad_norm`,
        then applied through the expert's own optimizer, so its moments carry over from call to call.
        The gradients a synchronous session may be accumulating are put aside and back meanwhile."""
        if not all(all_finite(d) for d in grads.values()):
            raise NonFiniteGradients(f"the gradients of this Backward on expert {uid} are not finite (NaN or Inf); "
                                     f"nothing was applied")
        params = list(e.module.parameters())
        pending = [p.grad for p in params]
        for p in params:
            p.grad = grads.get(p)
        try:
            if s.max_grad_norm > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm))
                if not math.isfinite(norm):   # finite entries whose norm overflows fp32: no scale makes them usable
                    raise NonFiniteGradients(f"the gradient norm of this Backward on expert {uid} overflows fp32; "
                                             f"nothing was applied")
            group = e.optimizer.param_groups[0]
            group.update(lr=s.lr, weight_decay=s.weight_decay, betas=(s.beta1, s.beta2), eps=s.eps)
            if not self.lazy:
                e.optimizer.step()
        finally:
            for p, grad in zip(params, pending):
                p.grad = grad
        e.version += 1

    # -- optimizer --------------------------------------------------------------------------

    def grad_sq_norm(self, uid: str, step: int, session_id: str = "") -> tuple[float, int]:
        """(sum of squared gradient entries, Backward calls) for (`session_id`, `step`); (0, 0)
        when this expert holds no gradients for them."""
        e = self._get(uid)
        if e.grad_step != step or e.grad_session != session_id:
            return 0.0, 0
        sq = sum(float(p.grad.double().pow(2).sum()) for p in e.module.parameters() if p.grad is not None)
        return sq, len(e.grad_calls)

    def apply_step(self, uid: str, step: int, lr: float, grad_scale: float = 0.0, weight_decay: float = 0.0,
                   beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, session_id: str = "") -> int:
        """AdamW on the gradients accumulated for `step` (scaled by `grad_scale`, 0 = 1), then
        clear them; returns the version. No gradients at all (the expert got no tokens this
        step) is a no-op, as for an in-process parameter whose .grad is None. Gradients that are
        not finite after scaling are discarded and NonFiniteGradients raised: one AdamW step on
        them would turn every weight into NaN."""
        e = self._get(uid)
        if not self._holds(e, uid, step, session_id):
            return e.version
        grads = [p.grad for p in e.module.parameters() if p.grad is not None]
        if grad_scale not in (0.0, 1.0):
            torch._foreach_mul_(grads, grad_scale)
        if not all(all_finite(g) for g in grads):
            self._finish(e, step)
            raise NonFiniteGradients(f"the gradients of step {step} on expert {uid} are not finite (NaN or Inf"
                                     f"{', after grad_scale' if grad_scale not in (0.0, 1.0) else ''}); they were "
                                     f"discarded and nothing was applied (send skip=true for such a step)")
        group = e.optimizer.param_groups[0]
        group.update(lr=lr, weight_decay=weight_decay, betas=(beta1, beta2), eps=eps)
        if not self.lazy:
            e.optimizer.step()
        self._finish(e, step)
        e.version += 1
        return e.version

    def skip_step(self, uid: str, step: int, session_id: str = "") -> int:
        """Discard the gradients accumulated for `step` without an update (the router skips a step
        whose global gradient norm is not finite); returns the version, unchanged. A late
        Backward for the step is then refused, as after `apply_step`."""
        e = self._get(uid)
        if self._holds(e, uid, step, session_id):
            self._finish(e, step)
        return e.version

    def _holds(self, e: _Expert, uid: str, step: int, session_id: str) -> bool:
        """Whether `e` holds gradients of (`session_id`, `step`); StepConflict when it holds another's."""
        if e.grad_step is None:
            return False
        if e.grad_session != session_id:
            raise StepConflict(f"expert {uid} holds gradients of training session {e.grad_session!r}, "
                               f"not {session_id!r}; nothing applied")
        if e.grad_step != step:
            raise StepConflict(f"expert {uid} holds gradients for step {e.grad_step}, not {step}; "
                               f"nothing applied")
        return True

    def _finish(self, e: _Expert, step: int) -> None:
        """The step is over (applied, skipped or discarded): its gradients go, late Backwards are refused."""
        e.applied = (e.grad_session, step)
        self._clear_grads(e)

    def replace_weights(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Load new weights (a merged global version) into hosted experts; their optimizer state
        and pending gradients start over, since the moments belong to the old weights."""
        for uid, state in states.items():
            e = self._get(uid)
            with torch.no_grad():
                for name, p in e.module.named_parameters():
                    p.copy_(state[name].to(p.device, p.dtype))
            self._clear_grads(e)
            e.optimizer = torch.optim.AdamW(e.module.parameters(), lr=0.0)
            e.applied = None

    def moments(self) -> dict[str, dict[str, torch.Tensor]]:
        """{uid: AdamW moments (CPU copies)} of the experts that have taken a step since they were
        loaded; run it on the compute worker, beside the weight snapshot it belongs to."""
        out = {}
        for uid, e in self._experts.items():
            moments = adamw_moments(e.module, e.optimizer)
            if moments:
                out[uid] = moments
        return out

    def restore_moments(self, moments: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, str]:
        """Install saved AdamW moments (`moments()` of an earlier run, for the same weights).
        Returns {uid: why it was not restored} for those that did not fit; those start Adam over."""
        refused = {}
        for uid, tensors in moments.items():
            if uid not in self._experts:
                refused[uid] = "not hosted here"
                continue
            e = self._experts[uid]
            try:
                restore_adamw_moments(e.module, e.optimizer, tensors, source=f"moments of expert {uid}")
            except MomentsError as err:
                refused[uid] = str(err)
        return refused

    def _retire(self, session_id: str) -> None:
        self._retired_sessions[session_id] = None
        while len(self._retired_sessions) > 64:
            self._retired_sessions.popitem(last=False)

    def _clear_grads(self, e: _Expert) -> None:
        e.optimizer.zero_grad(set_to_none=True)
        e.grad_step = None
        e.grad_calls.clear()
