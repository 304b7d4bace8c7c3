"""A KV cache of independent sequences, each in a slot of its own and at its own length.

    cache = SlotCache.for_model(model, slots=4)
    cache.bind([2]);    logits, _ = model(prompt, cache=cache)          # prefill slot 2: (1, T)
    cache.bind([0, 2]); logits, _ = model(last_tokens, cache=cache)     # one step of slots 0 and 2: (2, 1)
    cache.reset(2)                                                      # slot 2 is free again
    cache.bind([0, 1]); model(right_padded_prompts, cache=cache); cache.trim(0, 3)   # batched prefill

This is what continuous batching needs: sequences that started at different times advance in
one forward (one expert call per expert and layer for all of them), and a sequence joins or
leaves without touching the others. `bind` names, row by row, the slots the next forward
feeds; every row may sit at a different position, so each gets its own rotary angles and its
own attention mask over the keys cached in its slot. A row's result equals the same
sequence run alone with a `KVCache` up to float rounding.

Capacity grows on demand (`ensure`), so a router sized for 64 streams does not hold 64
streams' worth of keys while it serves two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class SlotCache:
    def __init__(self, n_layer: int, n_head: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, slots: int = 1):
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.block_size, self.dtype, self.device = block_size, dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths: list[int] = []          # tokens cached per slot
        self._rows: list[int] = []
        self._starts = torch.zeros(0, dtype=torch.long)
        self._slot_index = torch.zeros(0, dtype=torch.long)
        self._longest = 0
        self._first_of_run: int | None = None   # rows are the slots first, first + 1, ...: views, no gather
        self.ensure(slots)

    @classmethod
    def for_model(cls, model, slots: int = 1) -> SlotCache:
        cfg, p = model.cfg, model.tok_emb.weight
        return cls(cfg.n_layer, cfg.n_head, cfg.block_size, cfg.dim // cfg.n_head, p.dtype, p.device, slots)

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def ensure(self, slots: int) -> None:
        """Room for at least `slots` slots (doubling, so growth is rare); cached keys are kept."""
        if slots <= self.slots:
            return
        new = max(slots, 2 * self.slots)
        shape = (new, self.n_head, self.block_size, self.head_dim)
        for cached in (self.k, self.v):
            old = list(cached)
            cached.clear()
            for layer in range(self.n_layer):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old:
                    grown[:self.slots] = old[layer]
                cached.append(grown)
        self.lengths += [0] * (new - self.slots)

    def reset(self, slot: int) -> None:
        """Forget slot `slot`'s sequence (its stale keys are masked out and overwritten later)."""
        self.lengths[slot] = 0

    def trim(self, slot: int, length: int) -> None:
        """Keep only the first `length` cached tokens of `slot`: after a batched prefill whose shorter
        prompts were right-padded, the padding's keys are forgotten (and masked out from then on)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; cannot trim it to {length}")
        self.lengths[slot] = length

    def bind(self, rows: Sequence[int]) -> None:
        """The slots the next forward feeds, one per row of its input, each at most once."""
        rows = list(rows)
        if not rows or len(set(rows)) != len(rows) or not all(0 <= r < self.slots for r in rows):
            raise ValueError(f"bind takes distinct slots in 0..{self.slots - 1}, got {rows}")
        self._rows = rows
        starts = [self.lengths[r] for r in rows]
        self._starts = torch.tensor(starts, dtype=torch.long, device=self.device)
        self._slot_index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._longest = max(starts)
        self._first_of_run = rows[0] if rows == list(range(rows[0], rows[0] + len(rows))) else None

    # ---- what MoELM.forward asks ----------------------------------------------------------------

    @property
    def longest(self) -> int:
        """Tokens already cached in the longest bound slot."""
        return self._longest if self._rows else 0

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, batch: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, T, hd/2) tables: row b's positions start at its own slot's length."""
        if batch != len(self._rows):
            raise ValueError(f"the cache is bound to {len(self._rows)} slots but the input has {batch} rows")
        positions = self._starts[:, None] + torch.arange(t, device=self.device)
        return cos[positions][:, None], sin[positions][:, None]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store row b's new keys/values (B, H, T, hd) in its slot; returns the keys and values of the
        bound slots up to the longest, and the (B, 1, T, L) mask of what each query may see."""
        t = k.shape[2]
        query_pos = self._starts[:, None] + torch.arange(t, device=self.device)           # (B, T)
        # One scatter per tensor for every row (a decode step writes one position per row): a loop
        # over rows cost two small copies per row and layer.
        slots = self._slot_index[:, None].expand_as(query_pos)
        self.k[layer][slots, :, query_pos] = k.transpose(1, 2)                             # (B, T, H, hd)
        self.v[layer][slots, :, query_pos] = v.transpose(1, 2)
        length = self._longest + t
        if self._first_of_run is not None:   # consecutive slots: a view of the cache, no copy
            rows = slice(self._first_of_run, self._first_of_run + len(self._rows))
            keys, values = self.k[layer][rows, :, :length], self.v[layer][rows, :, :length]
        else:
            keys = self.k[layer][:, :, :length].index_select(0, self._slot_index)
            values = self.v[layer][:, :, :length].index_select(0, self._slot_index)
        # Query i of row b sits at position start_b + i and sees keys 0..start_b + i of its own slot;
        # the rest (longer rows' positions, stale keys of an earlier sequence) stays hidden.
        mask = torch.arange(length, device=self.device)[None, None, :] <= query_pos[:, :, None]
        return keys, values, mask[:, None]

    def advance(self, t: int) -> None:
        for slot in self._rows:
            self.lengths[slot] += t
        self._starts = self._starts + t
        self._longest += t
