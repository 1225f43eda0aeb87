"""Attention as TransformerLens computes it, for the layers SDPA cannot run exactly: attention
logits soft-capped (Gemma 2: `cap * tanh(s / cap)` before the mask) and sliding-window (local)
layers. Scores in the model's dtype, divided by the layer's `attn_scale`, masked, softmax."""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """`cap * tanh(x / cap)`, or `x` when there is no cap."""
    return x if cap is None else cap * torch.tanh(x / cap)


def cap_of(value: float | None) -> float | None:
    """A soft-cap setting of TransformerLens's config (<= 0 or None: off) as a cap or None."""
    return float(value) if value is not None and value > 0 else None


def exact_attention(q: Float[Tensor, "batch pos head d_head"], k: Float[Tensor, "batch kv_head key d_head"],
                    v: Float[Tensor, "batch kv_head key d_head"], mask: Bool[Tensor, "batch 1 pos_or_1 key"], *,
                    attn_scale: float, cap: float | None) -> Float[Tensor, "batch pos head d_head"]:
    """z for queries q over keys k and values v (grouped heads repeated) where `mask` allows."""
    rep = q.shape[2] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = soft_cap(q.transpose(1, 2) @ k.transpose(-1, -2) / attn_scale, cap)
    scores = scores.masked_fill(~mask, float("-inf"))
    pattern = torch.softmax(scores, dim=-1)
    pattern = torch.where(torch.isnan(pattern), 0.0, pattern).to(v.dtype)
    return (pattern @ v).transpose(1, 2)


def in_window(query_col: Int[Tensor, " pos"], n_keys: int, window: int) -> Bool[Tensor, "pos key"]:
    """Keys a sliding-window layer may read: the `window` columns up to each query's own."""
    cols = torch.arange(n_keys, device=query_col.device)
    return cols[None, :] > query_col[:, None] - window
