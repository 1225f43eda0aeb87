"""Triton kernels for the element-wise middle of a GPU decode step, each replacing several
PyTorch launches on the views `engine.fusion` leaves:

- `rotate_store`: rotate Q and K and write K and V into the static cache (one launch instead of
  six: roll, two multiplies, an add, two cache writes), reading Q, K and V where the joined
  projection left them, one program per (row, head);
- `silu_mul`: the gated MLP's act(gate) * up on the two halves of the joined projection (one launch
  instead of two strided element-wise passes).

- `add_rms_norm`: a residual add and the RMSNorm that reads its result (one launch instead of
  two), returning both.

All round each intermediate to the model's dtype, as PyTorch's element-wise operations do; on an
H100 in bfloat16 both are bit-identical to PyTorch (`benchmarks/bench_gpu.py` checks). The
rotation spells its bfloat16 rounding out on the bits (`_round`): written as casts, the compiler
dropped the intermediate roundings and 15% of the elements came out one rounding step off.
Set TRITON_INTERPRET=1 before importing to run them on CPU tensors.
"""

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor


@triton.jit
def _round(x, BF16: tl.constexpr):
    """float32 x rounded as PyTorch stores an element-wise result in the model's dtype, kept in
    float32. For bfloat16 the rounding (to nearest, ties to even) is spelled out on the bits, so no
    compiler pass can drop it and Triton's CPU interpreter (which truncates) rounds the same way;
    NaN stays NaN (on the bits, some NaNs would carry into the sign and come out as zeros)."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x


@triton.jit
def _rotate_store(qkv, row_stride, cos, sin, q_out, k_cache, v_cache, at,
                  cache_row, cache_head, HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                  BF16: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)                       # Q heads, then K heads, then V heads
    j = tl.arange(0, D)
    src = qkv + row.to(tl.int64) * row_stride + h * D
    x = tl.load(src + j)
    pos = tl.load(at).to(tl.int64)
    if h < HQ + HK:
        turned = tl.load(src + (j + D // 2) % D)           # the half-swap; its sign is in `sin`
        c = tl.load(cos + row * D + j).to(tl.float32)
        s = tl.load(sin + row * D + j).to(tl.float32)
        a = _round(x.to(tl.float32) * c, BF16)
        b = _round(turned.to(tl.float32) * s, BF16)
        y = _round(a + b, BF16).to(x.dtype)                 # exact: already representable
        if h < HQ:
            tl.store(q_out + (row * HQ + h) * D + j, y)
        else:
            tl.store(k_cache + row.to(tl.int64) * cache_row + (h - HQ) * cache_head + pos * D + j, y)
    else:
        tl.store(v_cache + row.to(tl.int64) * cache_row + (h - HQ - HK) * cache_head + pos * D + j, x)


def joined_views(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether q, k, v ([batch, 1, head, d_head]) are consecutive head ranges of one projection's
    output, as `fusion.qkv` returns them when no hook replaced them."""
    d = q.shape[-1]
    if q._base is None or k._base is not q._base or v._base is not q._base:
        return False
    if any(t.stride(-1) != 1 or t.stride(-2) != d or t.stride(0) != q.stride(0) for t in (q, k, v)):
        return False
    size = q.element_size()
    return (k.data_ptr() == q.data_ptr() + q.shape[2] * d * size
            and v.data_ptr() == k.data_ptr() + k.shape[2] * d * size)


def rotate_store(q: Float[Tensor, "batch 1 head d_head"], k: Float[Tensor, "batch 1 kv_head d_head"],
                 v: Float[Tensor, "batch 1 kv_head d_head"], cos: Float[Tensor, "batch 1 1 d_head"],
                 sin: Float[Tensor, "batch 1 1 d_head"], k_cache: Tensor, v_cache: Tensor,
                 at: Int[Tensor, " 1"]) -> Float[Tensor, "batch 1 head d_head"]:
    """Rotated q; rotated k and v written into the caches ([batch, kv_head, capacity, d_head],
    contiguous) at position `at`. `sin` carries the half-swap's sign (`fusion.Rotary`). The caller
    checks `joined_views(q, k, v)`."""
    b, _, hq, d = q.shape
    hk = k.shape[2]
    q_out = torch.empty((b, 1, hq, d), dtype=q.dtype, device=q.device)
    cos, sin = cos.reshape(-1, d)[:b].contiguous(), sin.reshape(-1, d)[:b].contiguous()
    _rotate_store[(b, hq + 2 * hk)](q, q.stride(0), cos, sin, q_out, k_cache, v_cache, at,
                                    k_cache.stride(0), k_cache.stride(1), HQ=hq, HK=hk, D=d,
                                    BF16=q.dtype == torch.bfloat16, num_warps=1)
    return q_out


@triton.jit
def _silu_mul(gate, up, out, row_stride, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    src = row.to(tl.int64) * row_stride + offs
    g = tl.load(gate + src, mask=ok, other=0.0)
    u = tl.load(up + src, mask=ok, other=0.0).to(tl.float32)
    g32 = g.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
    tl.store(out + row.to(tl.int64) * N + offs, (act.to(tl.float32) * u).to(g.dtype), mask=ok)


def silu_mul(gate: Float[Tensor, "batch pos d_mlp"], up: Float[Tensor, "batch pos d_mlp"]
             ) -> Float[Tensor, "batch pos d_mlp"] | None:
    """silu(gate) * up, or None when gate and up are not rows of equal stride (the caller then
    uses PyTorch)."""
    n = gate.shape[-1]
    rows = gate.numel() // n
    ok = (gate.shape == up.shape and gate.stride(-1) == 1 and up.stride(-1) == 1
          and gate.stride(-2) == up.stride(-2) and gate.dtype == up.dtype
          and (gate.dim() == 2 or gate.shape[0] == 1 or gate.stride(0) == gate.shape[1] * gate.stride(1)))
    if not ok:
        return None
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    _silu_mul[(rows, triton.cdiv(n, block))](gate, up, out, gate.stride(-2), N=n, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _add_then_norm(a, d, w, total, normed, eps, row, offs, ok, N: tl.constexpr, BF16: tl.constexpr):
    """Row `row`: total = a + d (d float32, already in the model's dtype's values), rounded, and
    normed = rms_norm(total) * w; both stored in a's dtype."""
    x = tl.load(a + row * N + offs, mask=ok, other=0.0)
    s = _round(x.to(tl.float32) + d, BF16)
    tl.store(total + row * N + offs, s.to(x.dtype), mask=ok)
    scale = 1.0 / tl.sqrt(tl.sum(s * s, 0) / N + eps)
    y = s * scale * tl.load(w + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(normed + row * N + offs, y.to(x.dtype), mask=ok)


@triton.jit
def _add_rms_norm(a, b, w, total, normed, eps, N: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    d = tl.load(b + row * N + offs, mask=ok, other=0.0).to(tl.float32)
    _add_then_norm(a, d, w, total, normed, eps, row, offs, ok, N, BF16)


def add_rms_norm(a: Float[Tensor, "*batch d"], b: Float[Tensor, "*batch d"], w: Float[Tensor, " d"],
                 eps: float) -> tuple[Tensor, Tensor] | None:
    """(a + b, rms_norm(a + b) * w), the sum rounded to the dtype before it is normalised; or None
    when the tensors are not contiguous bf16/fp32 of one shape (the caller then uses PyTorch)."""
    n = a.shape[-1]
    ok = (a.shape == b.shape and a.dtype == b.dtype == w.dtype and a.dtype in (torch.bfloat16, torch.float32)
          and a.is_contiguous() and b.is_contiguous() and w.is_contiguous() and tuple(w.shape) == (n,))
    if not ok:
        return None
    total, normed = torch.empty_like(a), torch.empty_like(a)
    _add_rms_norm[(a.numel() // n,)](a, b, w, total, normed, eps, N=n, BLOCK=triton.next_power_of_2(n),
                                     BF16=a.dtype == torch.bfloat16, num_warps=4)
    return total, normed
