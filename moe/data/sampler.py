"""Random training batches and deterministic evaluation batches over a :class:`Corpus`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from .corpus import SPLITS, Corpus

_STATE_VERSION = 1


class BatchSampler:
    """Pick a domain per sample (``domain_weights``, default uniform), then a random window.

    ``next()`` returns ``(x, y, domain_ids)``: ``x``/``y`` are ``torch.long`` of shape
    ``(batch_size, block_size)`` with ``y`` = ``x`` shifted left by one token, ``domain_ids``
    is ``torch.long`` ``(batch_size,)`` indexing ``corpus.domains``. The stream depends only on
    ``seed``; ``state_dict()``/``load_state_dict()`` resume it exactly.

    ``domain_weights`` is a mapping ``{domain: weight}`` (missing domains get 0) or a sequence
    aligned with ``corpus.domains``. By default every domain whose split holds at least
    ``block_size + 1`` tokens gets the same weight.
    """

    def __init__(
        self,
        corpus: Corpus,
        split: str = "train",
        block_size: int = 128,
        batch_size: int = 16,
        seed: int = 0,
        domain_weights: Mapping[str, float] | Sequence[float] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        for name, v in (("block_size", block_size), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.corpus = corpus
        self.split = split
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = int(seed)
        self.domains = list(corpus.domains)
        self._arrays = [corpus.tokens(split, d) for d in self.domains]
        self.probs = self._resolve_weights(domain_weights)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.steps = 0

    def _resolve_weights(self, weights) -> np.ndarray:
        long_enough = [len(a) >= self.block_size + 1 for a in self._arrays]
        if weights is None:
            w = np.array([1.0 if ok else 0.0 for ok in long_enough])
            if w.sum() == 0:
                raise ValueError(
                    f"no domain has {self.block_size + 1} tokens in the {self.split!r} split "
                    f"(sizes: {dict(zip(self.domains, map(len, self._arrays)))}); lower block_size"
                )
        else:
            if isinstance(weights, Mapping):
                unknown = set(weights) - set(self.domains)
                if unknown:
                    raise ValueError(
                        f"domain_weights names unknown domains {sorted(unknown)}; corpus has {self.domains}"
                    )
                w = np.array([float(weights.get(d, 0.0)) for d in self.domains])
            else:
                w = np.asarray(list(weights), dtype=float)
                if w.shape != (len(self.domains),):
                    raise ValueError(
                        f"domain_weights needs {len(self.domains)} entries "
                        f"(one per domain {self.domains}), got {len(w)}"
                    )
            if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"domain_weights must be finite, >= 0 and not all 0, got {w.tolist()}")
            for d, wi, ok in zip(self.domains, w, long_enough):
                if wi > 0 and not ok:
                    raise ValueError(
                        f"domain {d!r} has fewer than block_size+1={self.block_size + 1} "
                        f"tokens in the {self.split!r} split"
                    )
        return w / w.sum()

    # ------------------------------------------------------------------ training stream
    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.block_size
        dom = self._rng.choice(len(self.domains), size=B, p=self.probs)
        highs = np.array([len(self._arrays[d]) - T for d in dom], dtype=np.int64)
        starts = self._rng.integers(0, highs)
        buf = np.empty((B, T + 1), dtype=np.int64)
        for i, (d, s) in enumerate(zip(dom, starts)):
            buf[i] = self._arrays[d][s : s + T + 1]
        self.steps += 1
        x = torch.from_numpy(buf[:, :-1].copy())
        y = torch.from_numpy(buf[:, 1:].copy())
        return x, y, torch.from_numpy(dom.astype(np.int64))

    __next__ = next

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self

    def state_dict(self) -> dict:
        """Plain Python values (ints, str, lists): fine for torch.save(weights_only) and JSON."""
        return {
            "version": _STATE_VERSION,
            "rng": self._rng.bit_generator.state,
            "steps": self.steps,
            "seed": self.seed,
            "split": self.split,
            "domains": list(self.domains),
            "block_size": self.block_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported sampler state version {state.get('version')!r}")
        if list(state["domains"]) != self.domains:
            raise ValueError(
                f"sampler state was saved for domains {list(state['domains'])}, "
                f"this corpus has {self.domains}"
            )
        bitgen = np.random.PCG64()
        bitgen.state = dict(state["rng"])
        self._rng = np.random.Generator(bitgen)
        self.steps = int(state["steps"])

    # ------------------------------------------------------------------ evaluation
    def eval_windows(self, domain: str, max_batches: int | None = None, split: str = "val") -> int:
        """How many windows :meth:`eval_batches` yields for these arguments."""
        return len(self._eval_starts(domain, max_batches, split)[0])

    def _eval_starts(self, domain: str, max_batches: int | None, split: str):
        arr = self.corpus.tokens(split, domain)
        T = min(self.block_size, len(arr) - 1)
        if T < 1:
            return np.zeros(0, dtype=np.int64), arr, 0
        total = (len(arr) - 1) // T
        k = total if max_batches is None else min(total, max_batches * self.batch_size)
        # Spread k of the `total` aligned windows evenly over the split (k == total: all of them).
        idx = np.floor(np.arange(k) * (total / k)).astype(np.int64) if k else np.zeros(0, np.int64)
        return idx * T, arr, T

    def eval_batches(
        self, domain: str, max_batches: int | None = None, split: str = "val"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic, non-overlapping ``(x, y)`` windows of ``split`` (default ``val``).

        Windows are aligned at multiples of ``block_size`` so every target token is counted at
        most once; with ``max_batches`` they are spread evenly over the whole split. The last
        batch may be smaller; a split shorter than ``block_size + 1`` gives one shorter window.
        """
        if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 0):
            raise ValueError(f"max_batches must be None or >= 0, got {max_batches!r}")
        starts, arr, T = self._eval_starts(domain, max_batches, split)
        for b in range(math.ceil(len(starts) / self.batch_size)):
            chunk = starts[b * self.batch_size : (b + 1) * self.batch_size]
            buf = np.stack([np.asarray(arr[s : s + T + 1], dtype=np.int64) for s in chunk])
            yield torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
