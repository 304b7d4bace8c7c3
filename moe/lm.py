"""A decoder-only MoE language model (nanoGPT layout, modernized).

    from moe import MoELM, preset
    model = MoELM(preset("tiny"))
    logits, loss = model(idx, targets)        # idx, targets: (B, T) long

Token embedding -> n_layer x [RMSNorm -> rotary causal attention (SDPA) -> residual,
RMSNorm -> MoE FFN (or dense SwiGLU) -> residual] -> RMSNorm -> head tied to the embedding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moe.boundary import ExpertGroup
from moe.config import LMConfig
from moe.experts import SwiGLU
from moe.layer import MoE


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim/2) for rotary position embedding."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) by position-dependent angles. x: (B, H, T, hd)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to block_size.
    Every row is at the same position; `moe.slot_cache.SlotCache` keeps rows at their own."""

    def __init__(self, n_layer: int, batch: int, n_head: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, n_head, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0          # tokens already cached (same for every layer)
        self.block_size = block_size

    @property
    def longest(self) -> int:
        """Tokens already cached in the longest row the next forward feeds."""
        return self.length

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, batch: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables for the next `t` positions."""
        return cos[self.length:self.length + t], sin[self.length:self.length + t]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values (B, H, T, hd) of `layer`; returns every cached key, value and the
        attention mask (None = plain causal)."""
        b, t, start = k.shape[0], k.shape[2], self.length
        self.k[layer][:b, :, start:start + t] = k
        self.v[layer][:b, :, start:start + t] = v
        mask = None
        if start > 0:
            # Queries sit at positions start..start+t-1 and see every key up to their own.
            mask = torch.ones(t, start + t, dtype=torch.bool, device=k.device).tril(diagonal=start)
        return self.k[layer][:b, :, :start + t], self.v[layer][:b, :, :start + t], mask

    def advance(self, t: int) -> None:
        self.length += t


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.dim // cfg.n_head
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):  # x: (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask = None
        if cache is not None:
            k, v, mask = cache.extend(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int, experts: ExpertGroup | None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.is_moe = cfg.is_moe_block(layer)
        self.ffn = (MoE.from_config(cfg.moe_config(), experts=experts) if self.is_moe
                    else SwiGLU(cfg.dim, cfg.dense_inter_dim))

    def forward(self, x, cos, sin, cache=None, layer=0, routing_losses=True):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        h = self.ffn_norm(x)
        if self.is_moe:
            h, aux = self.ffn(h, routing_losses=routing_losses)
        else:
            h, aux = self.ffn(h), None
        return x + h, aux


class MoELM(nn.Module):
    """Decoder LM whose FFN blocks are MoE layers.

    `expert_groups` maps a block index to an ExpertGroup that replaces that block's
    in-process experts (the router passes remote groups here); blocks not in the map keep
    local experts.
    """

    def __init__(self, cfg: LMConfig, expert_groups: Mapping[int, ExpertGroup] | None = None):
        super().__init__()
        self.cfg = cfg
        groups = dict(expert_groups or {})
        bad = sorted(set(groups) - set(cfg.moe_layers()))
        if bad:
            raise ValueError(f"expert_groups given for blocks {bad}, but the MoE blocks are {cfg.moe_layers()}")
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i, groups.get(i)) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight          # tied: fewer parameters, better small-model loss
        cos, sin = rotary_tables(cfg.dim // cfg.n_head, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.last_stats: dict = {}
        self._init_weights()

    def _init_weights(self):
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)   # keeps the residual stream's variance flat in depth
        for name, p in self.named_parameters():
            if p.dim() < 2 or name.endswith("gate.weight"):
                continue                                        # norms stay 1; gates keep their own init
            nn.init.normal_(p, std=residual_std if name.endswith(("proj.weight", "w2.weight")) else std)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def expert_groups(self) -> list[ExpertGroup]:
        return [m.experts for m in self.moe_layers()]

    def num_params(self, active_only: bool = False) -> int:
        """Parameters in this process; with active_only, routed experts count k/E of theirs."""
        total = sum(p.numel() for p in self.parameters())
        if active_only:
            for m in self.moe_layers():
                if isinstance(m.experts, nn.Module):
                    routed = sum(p.numel() for p in m.experts.parameters())
                    total -= routed - routed * m.k // m.n_experts
        return total

    def _check_tokens(self, idx: torch.Tensor, start: int = 0) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
            raise ValueError(f"idx must be a (B, T) torch.long tensor, got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        if idx.shape[1] == 0 or start + idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence length {start + idx.shape[1]} must be in 1..block_size={self.cfg.block_size}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got "
                             f"min {int(idx.min())}, max {int(idx.max())}")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        """`cache`: a KVCache, or a SlotCache bound to the slots of idx's rows (see moe/slot_cache.py)."""
        self._check_tokens(idx, cache.longest if cache is not None else 0)
        t = idx.shape[1]
        if cache is not None:
            cos, sin = cache.rotary(self.rope_cos, self.rope_sin, idx.shape[0], t)
        else:
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.tok_emb(idx)                                   # (B, T, C)
        aux_total = x.new_zeros(())
        # The routing losses only matter to a loss: without targets or gradients (a decode step,
        # serving) nothing takes them, and they cost a quarter of a one-token MoE layer.
        routing_losses = targets is not None or torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            x, aux = block(x, cos, sin, cache, i, routing_losses)
            if aux is not None:
                aux_total = aux_total + aux
        if cache is not None:
            cache.advance(t)
        logits = self.head(self.norm(x))                        # (B, T, V)
        loss = ce = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
            loss = ce + aux_total
        self._record_stats(ce)
        return logits, loss

    def _record_stats(self, ce: torch.Tensor | None) -> None:
        layers = self.moe_layers()
        stats = [m.last_stats for m in layers]
        self.last_stats = {
            "ce_loss": float(ce.detach()) if ce is not None else float("nan"),
            "aux_loss": sum(s.balance_loss for s in stats) / max(1, len(stats)),
            "z_loss": sum(s.z_loss for s in stats) / max(1, len(stats)),
            "expert_counts": (torch.stack([s.expert_counts for s in stats]) if stats
                              else torch.zeros(0, self.cfg.n_experts, dtype=torch.long)),
            "masked_calls": sum(len(s.masked_experts) for s in stats),
            "dropped": sum(s.dropped for s in stats),
        }

    def configure_optimizer(self, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8):
        """AdamW over this process's parameters: matrices decay, norms and gate-free vectors don't."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)

    def new_cache(self, batch: int) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_head, self.cfg.block_size,
                       self.cfg.dim // self.cfg.n_head, p.dtype, p.device)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to idx (B, T). temperature 0 = greedy."""
        pieces = [idx] + [tok[:, None] for tok in self.stream(idx, max_new_tokens, temperature, top_k,
                                                               use_cache, generator)]
        return torch.cat(pieces, dim=1)

    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, use_cache: bool = True,
               generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield one (B,) tensor of sampled token ids per step (what `generate` and streaming RPCs use).

        With the cache, the prompt is encoded once and each step feeds one token; when the
        context reaches block_size the cache restarts from the last block_size/2 tokens.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be positive or None, got {top_k}")
        self._check_tokens(idx[:, -self.cfg.block_size:])
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                cache = None
                feed = idx[:, -self.cfg.block_size:]
                for _ in range(max_new_tokens):
                    if use_cache:
                        if cache is None or cache.length + feed.shape[1] > self.cfg.block_size:
                            cache = self.new_cache(idx.shape[0])
                            feed = idx[:, -(self.cfg.block_size // 2):]
                        logits, _ = self(feed, cache=cache)
                    else:
                        logits, _ = self(idx[:, -self.cfg.block_size:])
                    next_tok = sample_next(logits[:, -1, :], temperature, top_k, generator)
                    idx = torch.cat((idx, next_tok), dim=1)
                    feed = next_tok
                    yield next_tok[:, 0]
        finally:
            self.train(was_training)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from (B, V) logits."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # Shift so the best logit is 0 before dividing: a tiny temperature then sends the others to
    # -inf (argmax in the limit) instead of overflowing every logit to inf and softmax to NaN.
    # The division is in float32, where a temperature like 1e-46 is 0 and the best logit's 0/0 would
    # be NaN: one below float32's smallest normal divides as that instead (the same argmax).
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
