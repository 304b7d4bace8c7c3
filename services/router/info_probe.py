"""The chain directory's Info calls (ROUTER_DISCOVERY=chain): each addressed to one hotkey.

Unlike the router's call pool, which looks up at signing time which hotkey serves an endpoint,
a probe's receiver is fixed for the call: two hotkeys listing one endpoint are asked in their own
names even when asked at once, and the answer is taken only with the signature of the hotkey it is
credited to. Answers are small (an ExpertInfo per hosted expert), so a probe accepts at most
MAX_ANSWER_BYTES: a hostile service cannot make the router parse megabytes every refresh.

    probe = InfoProbe(identity)
    info = probe("10.0.0.5:50051", "5F...", timeout_s=2.0)
    probe.retain({"10.0.0.5:50051"})   # channels of endpoints no longer listed are closed
"""

from __future__ import annotations

import threading
from collections.abc import Collection

import grpc

from subnet.auth.client import SigningChannel
from subnet.identity import Identity
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc

MAX_ANSWER_BYTES = 1 << 20   # 4,096 ExpertInfo entries take about 100 kB


class InfoProbe:
    """Thread-safe; one channel per endpoint, closed when the endpoint is no longer listed."""

    def __init__(self, identity: Identity | None, max_answer_bytes: int = MAX_ANSWER_BYTES):
        self.identity = identity
        self._options = [("grpc.max_receive_message_length", max_answer_bytes),
                         ("grpc.max_send_message_length", 1 << 16)]
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def __call__(self, endpoint: str, hotkey: str, timeout_s: float) -> expert_pb2.InfoResponse:
        with self._lock:
            channel = self._channels.get(endpoint)
            if channel is None:
                channel = self._channels[endpoint] = grpc.insecure_channel(endpoint, options=self._options)
        stub = expert_pb2_grpc.ExpertStub(SigningChannel(channel, self.identity, hotkey))
        return stub.Info(expert_pb2.InfoRequest(), timeout=timeout_s)

    def retain(self, endpoints: Collection[str]) -> None:
        """Close the channels of every endpoint not in `endpoints` (miners come and go)."""
        keep = set(endpoints)
        with self._lock:
            gone = [self._channels.pop(e) for e in list(self._channels) if e not in keep]
        for channel in gone:
            channel.close()

    def close(self) -> None:
        self.retain(())
