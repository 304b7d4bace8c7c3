"""A RemoteExpertGroup whose expert calls hang off one span per MoE layer and phase.

    group = TracedExpertGroup(layer, n_experts, dim, replicas, tracer=ExpertCallTracer(), ...)

Every batch of concurrent expert calls (a layer's Forward calls, its Backward calls, the
GradNorm and ApplyStep calls of a step) goes through `_gather`; wrapping it gives the trace
one `moe.layer/<RPC>` span per layer and phase, with the call spans (and, through the
`traceparent` they send, the experts' SERVER spans) as its children. The span says how many
calls there were and which experts were given up on.

This lives beside RemoteExpertGroup rather than inside it only because that module has
another owner right now; folding `tracer.layer(...)` into `RemoteExpertGroup._gather`
makes this class unnecessary.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.router.remote_experts import RemoteExpertGroup


class TracedExpertGroup(RemoteExpertGroup):
    def _gather(self, calls: Sequence, timeout_s: float) -> None:
        if not calls:
            return super()._gather(calls, timeout_s)
        with self.tracer.layer(self.layer, calls[0].rpc, len(calls)) as span:
            super()._gather(calls, timeout_s)
            failed = sorted(f"{c.uid}:{c.failed[0]}" for c in calls if c.failed is not None)
            if failed:
                span.set_attribute("moe.given_up", failed)
