"""A ReplicaSource (what services.router.replicas.ReplicaSet reads) that lists one service for a
fixed set of expert uids: tests that talk to one expert service need no registry."""

from __future__ import annotations

from collections.abc import Iterable

from subnet.registry import Replica


class OneService:
    def __init__(self, endpoint: str, hotkey: str, uids: Iterable[str]):
        self.replicas = {uid: [Replica(uid, endpoint, hotkey, 0, 0, 0)] for uid in uids}

    def all_replicas(self):
        return self.replicas
