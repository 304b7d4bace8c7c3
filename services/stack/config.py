"""Settings of the local stack, from environment variables (`python -m services.stack --env-table`)."""

from __future__ import annotations

from dataclasses import dataclass

from subnet.envconfig import env


@dataclass(frozen=True)
class StackConfig:
    run_dir: str = env("STACK_RUN_DIR", "runs/demo", "where the run's checkpoints, metrics, plots and logs go")
    preset: str = env("STACK_PRESET", "small", "model preset: tiny, small or base")
    train_minutes: float = env("STACK_TRAIN_MINUTES", 5.0, "training budget of `demo` (wall clock)")
    redis_port: int = env("STACK_REDIS_PORT", 6399, "embedded Redis port")
    # The stack's gRPC ports sit below Linux's ephemeral range (32768-60999 by default): a port in
    # it can be the local end of some outgoing connection for a while, and the stack then refuses
    # to start ("already in use"), as `make demo` once did with 50062 right after the test suite.
    router_port: int = env("STACK_ROUTER_PORT", 15050, "router gRPC port")
    expert_ports: tuple[str, ...] = env("STACK_EXPERT_PORTS", ("15061", "15062"),
                                        "one port per honest miner; each hosts every routed expert (replicas); "
                                        "the adversaries take the ports after the highest one")
    adversaries: tuple[str, ...] = env("STACK_ADVERSARIES", ("lazy", "copycat"),
                                       "adversarial test miners the demo adds (lazy, noisy, copycat, liar; empty = "
                                       "none), to show that cheaters lose")
    s3_port: int = env("STACK_S3_PORT", 8333, "embedded S3 server (SeaweedFS) port; its other ports are picked free")
    metrics_base_port: int = env("STACK_METRICS_BASE_PORT", 9100,
                                 "router metrics here, expert services on the next ports; 0 = off")
    discovery: str = env("STACK_DISCOVERY", "chain",
                         "how the router finds the miners: `chain` (each publishes its endpoint on the local chain, "
                         "ROUTER_DISCOVERY=chain; the miners write no registry entry) or `registry` (their Redis "
                         "heartbeats)")
    wire_dtype: str = env("STACK_WIRE_DTYPE", "fp32", "activations on the wire: fp32, bf16, fp16 or int8")
    expert_timeout_s: float = env("STACK_EXPERT_TIMEOUT_S", 10.0, "router's deadline per layer of expert calls")
    router_threads: int = env("STACK_ROUTER_THREADS", 2, "torch threads of the router process")
    expert_threads: int = env("STACK_EXPERT_THREADS", 1, "torch threads of each expert process")
    prompt: str = env("STACK_PROMPT", "ROMEO:", "prompt of the demo's Generate request")
    max_new_tokens: int = env("STACK_MAX_NEW_TOKENS", 80, "tokens the demo's Generate request asks for")

    def __post_init__(self):
        if self.preset not in ("tiny", "small", "base"):
            raise ValueError(f"STACK_PRESET={self.preset!r}: choose tiny, small or base")
        if self.discovery not in ("chain", "registry"):
            raise ValueError(f"STACK_DISCOVERY={self.discovery!r}: choose chain or registry")
        if not self.expert_ports:
            raise ValueError("STACK_EXPERT_PORTS is empty: give at least one port, e.g. 15061,15062")
        if self.expert_timeout_s <= 0 or self.train_minutes <= 0:
            raise ValueError(f"STACK_EXPERT_TIMEOUT_S={self.expert_timeout_s} and STACK_TRAIN_MINUTES="
                             f"{self.train_minutes} must be positive")
        try:
            ports = [int(p) for p in self.expert_ports]
        except ValueError:
            raise ValueError(f"STACK_EXPERT_PORTS={','.join(self.expert_ports)!r} must be comma-separated "
                             "integers") from None
        from services.expert.adversary import MODES
        unknown = [a for a in self.adversaries if a not in MODES]
        if unknown:
            raise ValueError(f"STACK_ADVERSARIES: unknown {unknown}; choose from {', '.join(MODES)}")
        # Only the range here: which ports must differ depends on the mode (`serve` starts no
        # adversary, validator or scorer), so run_stack checks that on the ports it will use.
        everything = [self.redis_port, self.router_port, self.s3_port, *ports]
        if not all(0 < p < 65536 for p in everything):
            raise ValueError(f"stack ports must be in 1..65535, got {everything}")
        if self.metrics_base_port < 0:
            raise ValueError(f"STACK_METRICS_BASE_PORT={self.metrics_base_port} must be 0 (off) or a port")
        if self.train_minutes <= 0 or self.max_new_tokens <= 0:
            raise ValueError("STACK_TRAIN_MINUTES and STACK_MAX_NEW_TOKENS must be positive")
        # Checked here, not by the router and experts that take them: those start only after the
        # corpus is built and the initial model trained, minutes into a demo.
        from subnet.tensor_codec import WIRE_DTYPES
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"STACK_WIRE_DTYPE={self.wire_dtype!r}: choose one of {', '.join(WIRE_DTYPES)}")
        if self.router_threads < 0 or self.expert_threads < 0:
            raise ValueError(f"STACK_ROUTER_THREADS={self.router_threads} and STACK_EXPERT_THREADS="
                             f"{self.expert_threads} must be >= 0 (0 = torch's default)")
        if not self.prompt:
            raise ValueError("STACK_PROMPT is empty: give the text the demo's Generate request continues")
        if not self.run_dir.strip():
            raise ValueError("STACK_RUN_DIR is empty: give the run's directory, e.g. runs/demo")

    @property
    def ports(self) -> list[int]:
        return [int(p) for p in self.expert_ports]

    def metrics_port(self, index: int) -> int:
        """0 = router, 1.. = expert services."""
        return self.metrics_base_port + index if self.metrics_base_port else 0
