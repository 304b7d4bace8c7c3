"""The local stack's incentive layer: an embedded S3 server (SeaweedFS), the local chain in the
stack's Redis, and the registration of every wallet on it; afterwards, what happened in the
rounds (commitments revealed, checkpoints published per service).

The chain's blocks and the round schedule follow CHAIN_BLOCK_S and ROUND_*_BLOCKS from the
stack's own environment (defaults: 1 s blocks, 60-block rounds), and every child process
gets the same values, so all of them agree on the round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import redis

from subnet.chain.config import ChainConfig
from subnet.chain.local import LocalChain
from subnet.dev.s3_server import S3Server
from subnet.envconfig import from_env
from subnet.object_store import ObjectStore, S3Config
from subnet.rounds import PHASES, RoundConfig

ROUTER_STAKE = 1.0   # the router holds stake, so it has the validator permit the experts require
BUCKET = "moe-subnet"


@dataclass
class Member:
    name: str        # "router", "expert-0", ...
    hotkey: str
    uid: int = -1


@dataclass
class SubnetLayer:
    redis_url: str
    s3_port: int
    members: list[Member] = field(default_factory=list)

    def __post_init__(self):
        self.chain_config = from_env(ChainConfig)
        self.round_config = from_env(RoundConfig)
        self.schedule = self.round_config.schedule()
        self.s3: S3Server | None = None
        self.store: ObjectStore | None = None
        self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self.chain = LocalChain(self._redis, self.schedule, block_s=self.chain_config.block_s,
                                key_prefix=self.chain_config.key_prefix)

    def start(self) -> None:
        self.s3 = S3Server(port=self.s3_port).start()
        self.store = ObjectStore(from_env(S3Config, self.s3.env(bucket=BUCKET)))
        self.store.ensure_bucket()
        self.chain.genesis()

    def register(self, name: str, hotkey: str, stake: float = 0.0) -> Member:
        member = Member(name, hotkey, self.chain.register(hotkey, stake=stake))
        self.members.append(member)
        return member

    def env(self) -> dict[str, str]:
        """What every child needs to reach S3 and the chain and to agree on the rounds."""
        rounds = {f"ROUND_{phase.upper()}_BLOCKS": str(getattr(self.round_config, f"{phase}_blocks"))
                  for phase in PHASES}
        return {**self.s3.env(bucket=BUCKET), "CHAIN": "local", "CHAIN_REDIS_URL": self.redis_url,
                "CHAIN_KEY_PREFIX": self.chain_config.key_prefix, "CHAIN_BLOCK_S": str(self.chain_config.block_s),
                **rounds}

    @property
    def endpoint(self) -> str:
        return self.s3.endpoint if self.s3 else ""

    def summary(self) -> list[str]:
        """Lines for the demo's summary: rounds, commitments revealed, checkpoints per service."""
        now = self.schedule.at(self.chain.block())
        by_hotkey = {m.hotkey: m for m in self.members}
        revealed: dict[str, list[int]] = {m.name: [] for m in self.members}
        rounds_done = 0
        for r in range(now.round + 1):
            commitments = self.chain.commitments(r)
            if any(c.revealed for c in commitments):
                rounds_done += 1
            for c in commitments:
                if c.revealed and c.hotkey in by_hotkey:
                    revealed[by_hotkey[c.hotkey].name].append(r)
        lines = [f"rounds: now round {now.round} ({now.phase}); {rounds_done} rounds with revealed commitments "
                 f"({self.schedule.tempo_blocks} blocks of {self.chain_config.block_s:g} s per round)"]
        keys = self.store.list("checkpoints/") if self.store else []
        for m in self.members:
            if m.name in ("client", "scorer"):
                continue
            mine = [k for k in keys if k.endswith("manifest.json") and (
                f"/{m.hotkey}/" in k or (m.name == "router" and "/trunk/" in k)
                or (m.name == "validator" and "/global/" in k))]
            example = next(iter(sorted(mine, key=_round_of, reverse=True)), "-")
            lines.append(f"  {m.name:<9} uid {m.uid:<2} {m.hotkey[:10]}...  commitments revealed in rounds "
                         f"{revealed[m.name] or '-'}; {len(mine)} checkpoints in s3://{BUCKET}, newest {example}")
        return lines

    def write_history(self, path: Path) -> None:
        """Every commitment of the run as JSON (round, member, digest, revealed data)."""
        now = self.schedule.at(self.chain.block())
        names = {m.hotkey: m.name for m in self.members}
        rows = [{"round": r, "member": names.get(c.hotkey, c.hotkey), "digest": c.digest,
                 "commit_block": c.commit_block, "commit_index": c.commit_index, "revealed": c.revealed}
                for r in range(now.round + 1) for c in self.chain.commitments(r)]
        path.write_text(json.dumps(rows, indent=1) + "\n")

    def write_report(self, path: Path, miners, merges: Path) -> None:
        """The run's outcome as JSON: every member (role, uid, incentive, the weight each validator
        gave it) and the validator's merges. The end-to-end test reads it."""
        graph = self.chain.metagraph()
        weights = self.chain.weights()
        adversary = {m.name: m.adversary for m in miners}
        members = []
        for m in self.members:
            neuron = graph.by_hotkey(m.hotkey)
            members.append({"name": m.name, "hotkey": m.hotkey, "uid": m.uid,
                            "adversary": adversary.get(m.name, ""), "miner": m.name in adversary,
                            "incentive": neuron.incentive if neuron else 0.0,
                            "weights": {str(v): w.get(m.uid, 0.0) for v, w in weights.items()}})
        rows = [json.loads(line) for line in merges.read_text().splitlines() if line.strip()] if merges.exists() else []
        path.write_text(json.dumps({"block": graph.block, "members": members, "merges": rows}, indent=1) + "\n")

    def stop(self) -> None:
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None
        self._redis.close()


def _round_of(key: str) -> int:
    parts = key.split("/")
    return int(parts[-2]) if len(parts) > 2 and parts[-2].isdigit() else -1
