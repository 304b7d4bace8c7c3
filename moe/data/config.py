"""Settings of the bundled training corpus."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

BUILTIN_DOMAINS: tuple[str, ...] = ("prose", "scripture", "code")
USER_DOMAIN = "user"
EOS_TOKEN = "<|endoftext|>"

# Smallest vocabulary that still leaves room for merges: 256 byte tokens + EOS + a few merges.
MIN_VOCAB_SIZE = 260
MAX_VOCAB_SIZE = 1 << 20


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """What to read, how to split it and how to tokenize it.

    ``user_paths`` adds a ``user`` domain (local ``.txt``/``.jsonl`` files or folders).
    ``max_bytes_per_domain`` caps every domain (documents are taken in order, the one that
    crosses the cap is cut at a line boundary); ``None`` means no cap.
    """

    vocab_size: int = 8192
    user_paths: tuple = ()
    cache_dir: str | os.PathLike = ".cache/moe-data"
    val_fraction: float = 0.1
    seed: int = 0
    max_bytes_per_domain: int | None = 8_000_000
    domains: tuple = BUILTIN_DOMAINS

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"CorpusConfig: {msg}")

        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            fail(f"vocab_size must be an int, got {self.vocab_size!r}")
        if not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            fail(f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}], got {self.vocab_size}")

        user_paths = self.user_paths
        if isinstance(user_paths, (str, os.PathLike)):
            user_paths = (user_paths,)
        try:
            user_paths = tuple(user_paths)
        except TypeError:
            fail(f"user_paths must be a sequence of paths, got {self.user_paths!r}")
        for p in user_paths:
            if not isinstance(p, (str, os.PathLike)) or str(p) == "":
                fail(f"user_paths entries must be non-empty paths, got {p!r}")
        object.__setattr__(self, "user_paths", tuple(str(p) for p in user_paths))

        if not isinstance(self.cache_dir, (str, os.PathLike)) or str(self.cache_dir) == "":
            fail(f"cache_dir must be a non-empty path, got {self.cache_dir!r}")

        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 < float(vf) < 1.0:
            fail(f"val_fraction must be a number strictly between 0 and 1, got {vf!r}")
        object.__setattr__(self, "val_fraction", float(vf))

        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            fail(f"seed must be an int, got {self.seed!r}")

        cap = self.max_bytes_per_domain
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
            fail(f"max_bytes_per_domain must be a positive int or None, got {cap!r}")

        domains = self.domains
        if isinstance(domains, str):
            domains = (domains,)
        domains = tuple(domains)
        for d in domains:
            if d == USER_DOMAIN:
                fail(f"the {USER_DOMAIN!r} domain is added by giving user_paths, not via domains")
            if d not in BUILTIN_DOMAINS:
                fail(f"unknown domain {d!r}; choose from {BUILTIN_DOMAINS}")
        if len(set(domains)) != len(domains):
            fail(f"duplicate entries in domains: {domains}")
        if not domains and not self.user_paths:
            fail("no data: domains is empty and no user_paths were given")
        object.__setattr__(self, "domains", domains)

    @classmethod
    def from_dict(cls, data: dict) -> CorpusConfig:
        """Inverse of dataclasses.asdict after a JSON round trip (lists back to tuples; unknown keys ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})

    @property
    def all_domains(self) -> list[str]:
        """The corpus domains in order: the built-in ones, then ``user`` when user_paths is set."""
        return list(self.domains) + ([USER_DOMAIN] if self.user_paths else [])

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)
