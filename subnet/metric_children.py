"""A prometheus metric's labelled children, each looked up once.

    latency = Children(metrics.rpc_latency)
    latency("Forward").observe(0.001)     # same child as metrics.rpc_latency.labels("Forward")

`metric.labels(...)` checks and joins its arguments and takes the metric's lock on every call
(1.5-2 us here); a decode-sized expert call made seven such calls. The children are the ones
`labels()` returns, so the exposition is unchanged. Only for label values from a bounded set
(hosted experts, RPC names, status codes): prometheus_client keeps every child anyway, and a
child removed from the metric would go on being updated here unseen.
"""

from __future__ import annotations

from typing import Any


class Children:
    def __init__(self, metric: Any):
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child
