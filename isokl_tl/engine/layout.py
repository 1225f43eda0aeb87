"""Store a HookedTransformer's weights in the memory layout its forward pass asks for.

TransformerLens 3.9 turns several weights into another layout on every call: the MLP and unembed
call `F.linear(x, W.T.contiguous())`, attention calls `rearrange(W_Q, "h m d -> (h d) m")` and
`rearrange(W_O, "h d m -> m (h d)").contiguous()`. When a parameter is already a strided view of a
tensor laid out the way those calls want, `.contiguous()` and the rearranges become free views, and
`F.linear` sees exactly the same contiguous operand as before, so the result is bit-identical. At
decode time (one token per step) the copies dominate on CPU; removing them is about 3x faster.

Weights that the fast decoders multiply together are also stored together: Q, K and V of a block as
consecutive rows of one block of memory, and the gated MLP's gate and input projections likewise
(`engine.fusion` multiplies each group at once). Each parameter is a view of its rows, which are
the same contiguous matrix as before, so TransformerLens's forward is still bit-identical.
"""

import torch
from torch import nn
from transformer_lens import HookedTransformer


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    assert value.shape == param.shape and value.dtype == param.dtype
    param.data = value


def _qkv_views(ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each [head, d_model, d_head] weight backed by consecutive rows of one contiguous
    [(head d_head) + ..., d_model] block."""
    block = torch.cat([w.detach().permute(0, 2, 1).reshape(-1, w.shape[1]) for w in ws])
    out, at = [], 0
    for h, m, d in (w.shape for w in ws):
        out.append(block[at:at + h * d].view(h, d, m).permute(0, 2, 1))
        at += h * d
    return out


def _out_view(w: torch.Tensor) -> torch.Tensor:
    """[head, d_head, d_model] backed by a contiguous [d_model, (head d_head)] block."""
    h, d, m = w.shape
    block = w.detach().permute(2, 0, 1).reshape(m, h * d).contiguous()
    return block.view(m, h, d).permute(1, 2, 0)


def _transposed_views(ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each [in, out] weight backed by consecutive rows of one contiguous [out + ..., in] block, so
    `.T.contiguous()` is free."""
    block = torch.cat([w.detach().T for w in ws])
    out, at = [], 0
    for w in ws:
        out.append(block[at:at + w.shape[1]].T)
        at += w.shape[1]
    return out


def _restore(params: list[nn.Parameter], views) -> None:
    for param, value in zip(params, views(params), strict=True):
        _set(param, value)


@torch.no_grad()
def relayout_for_decode(model: HookedTransformer) -> HookedTransformer:
    """Re-store the weights of `model` in place (values unchanged) and return it."""
    if model.cfg.load_in_4bit:
        return model
    for block in model.blocks:
        attn = block.attn
        names = ("W_Q", "_W_K", "_W_V") if "_W_K" in attn._parameters else ("W_Q", "W_K", "W_V")
        qkv = [attn._parameters.get(name) for name in names]
        if all(p is not None for p in qkv) and len({p.dtype for p in qkv}) == 1:
            _restore(qkv, _qkv_views)
        if "W_O" in attn._parameters:
            _set(attn.W_O, _out_view(attn.W_O))
        mlp = block.mlp._parameters
        if mlp.get("W_gate") is not None and mlp.get("W_in") is not None:
            _restore([mlp["W_gate"], mlp["W_in"]], _transposed_views)
        elif mlp.get("W_in") is not None:
            _restore([mlp["W_in"]], _transposed_views)
        if mlp.get("W_out") is not None:
            _restore([mlp["W_out"]], _transposed_views)
    _restore([model.unembed.W_U], _transposed_views)
    return model
