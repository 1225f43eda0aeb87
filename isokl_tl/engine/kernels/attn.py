"""One decode step's attention as two Triton kernels, reading only the keys written so far
(optionally rotating q and the new key first, and storing the new key and value).

`GraphDecoder` keeps every step the same shape for its CUDA graph, so attention through
`scaled_dot_product_attention` reads the whole static cache (capacity keys) under a mask, even
early in a rollout when most of it is empty. Here the number of keys in use is read on the device
(the write position, which the graph moves on in place), and:

- `_partial`: one program per (row, key-value head, slice of the cache) takes all query heads of
  that group at once (grouped-query heads share each key and value they load), runs an online
  softmax over its slice's keys that are in use and not masked out, and writes an unnormalised
  partial output with its running maximum and sum; slices past the last key return at once;
- `_combine`: one program per (row, query head) merges the slices (flash-decoding).

Soft-capped scores (Gemma 2) and sliding-window layers (the last `window` keys up to the newest;
slices wholly before it return at once) are options of the same kernels.

The number of slices is a run-time argument, so a new cache capacity compiles `_partial` again only
where Triton's specialisation of its integer arguments changes (values of 1, multiples of 16), and
`_combine` at each new power of two of the slice count (its compile-time bound).

`rotate_attend` takes the step's unrotated q, k, v straight from the joined projection: each
`_partial` program rotates its group's queries, and the program whose slice holds the new position
rotates and stores the new key and value before reading its slice (one launch per layer fewer than
`kernels.block.rotate_store` followed by `decode_attention`, with the same numbers).

Softmax and accumulation in float32. For bfloat16/float16 models both products run on tensor
cores in the model's dtype (the probabilities rounded to it for the second, as flash attention and
cuDNN do); for float32 models they are float32 products (`input_precision="ieee"`: no
TensorFloat-32). The output is rounded once to the model's dtype. A row whose keys are all masked
out gets zeros (SDPA gives NaN there; such rows do not occur in a rollout). Set TRITON_INTERPRET=1
before importing to run on CPU tensors (then every product is float32: the interpreter has no
16-bit products).
"""

import os

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from isokl_tl.engine.kernels.block import _round

BLOCK = 64          # keys per inner iteration
SLICE = 64          # keys per program
WARPS = 2           # (`benchmarks/tune_attention.py` on an H100, caches read from memory: best mean over fills)
STAGES = 3          # software-pipelining depth of the key loop
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _rotated(src, cos, sin, row, j, D: tl.constexpr, BF16: tl.constexpr):
    """Head vectors at `src` (offsets j, the last axis) rotated exactly as `kernels.block.rotate_store`
    rotates them (its roundings spelled out on the bits), in their own dtype."""
    x = tl.load(src + j)
    turned = tl.load(src + (j + D // 2) % D)             # the half-swap; its sign is in `sin`
    c = tl.load(cos + row * D + j).to(tl.float32)
    s = tl.load(sin + row * D + j).to(tl.float32)
    a = _round(x.to(tl.float32) * c, BF16)
    b = _round(turned.to(tl.float32) * s, BF16)
    return _round(a + b, BF16).to(x.dtype)


@triton.jit
def _tanh(y):
    """tanh to float32's relative precision from exp alone (the interpreter has no libdevice):
    a Taylor series near 0, where `(1 - t) / (1 + t)` would lose digits."""
    t = tl.exp(-2.0 * tl.abs(y))
    far = (1.0 - t) / (1.0 + t)
    far = tl.where(y < 0, -far, far)
    y2 = y * y
    return tl.where(tl.abs(y) < 0.05, y * (1.0 - y2 / 3.0 + 2.0 * y2 * y2 / 15.0), far)


@triton.jit
def _partial(q, q_row, q_head, k, v, kv_row, kv_head, mask, mask_row, at, acc_out, ml_out, scale, cos, sin,
             cap, window, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
             SLICE: tl.constexpr, BLOCK: tl.constexpr, S, LOW: tl.constexpr,
             ROTATE: tl.constexpr, BF16: tl.constexpr, CAP: tl.constexpr):
    pid = tl.program_id(0)
    row, g = pid // HKV, pid % HKV
    s = tl.program_id(1)
    n = tl.load(at) + 1                         # keys in use: up to and including the newest
    first = tl.maximum(n - window, 0)           # a sliding window's oldest key (no window: a huge one)
    start = s * SLICE
    heads = tl.arange(0, GP)
    in_group = heads < G
    j = tl.arange(0, D)
    out = ((row * HKV + g) * G + heads).to(tl.int64) * S + s       # [row, head, slice] flattened
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    base = row.to(tl.int64) * kv_row + g * kv_head
    if (start < n) & (start + SLICE > first):    # slices past the newest key or before the window: nothing
        if ROTATE:      # q, k, v: one row of the joined projection, unrotated; k and v not yet stored
            heads_q = tl.minimum(heads, G - 1)                 # padding heads repeat a real one
            qs = _rotated(q + row.to(tl.int64) * q_row + (g * G + heads_q)[:, None] * D, cos, sin, row,
                          j[None, :], D, BF16)
            if n - 1 < start + SLICE:                          # this slice holds the newest key: store it
                kv_src = q + row.to(tl.int64) * q_row + (HKV * G + g) * D
                kt = _rotated(kv_src, cos, sin, row, j, D, BF16)
                tl.store(k + base + (n - 1) * D + j, kt)
                tl.store(v + base + (n - 1) * D + j, tl.load(kv_src + HKV * D + j))
                tl.debug_barrier()                             # the loop below reads them back
        else:
            qs = tl.load(q + row.to(tl.int64) * q_row + (g * G + heads)[:, None] * q_head + j[None, :],
                         mask=in_group[:, None], other=0.0)
        if not LOW:
            qs = qs.to(tl.float32)
        for off in range(0, SLICE, BLOCK):
            keys = start + off + tl.arange(0, BLOCK)
            used = keys < n
            live = (tl.load(mask + row.to(tl.int64) * mask_row + keys, mask=used, other=0) != 0) & (keys >= first)
            kt = tl.load(k + base + keys[:, None] * D + j[None, :], mask=used[:, None], other=0.0)
            if LOW:
                sc = tl.dot(qs, tl.trans(kt)) * scale
            else:
                sc = tl.dot(qs, tl.trans(kt.to(tl.float32)), input_precision="ieee") * scale
            if CAP:             # soft cap
                sc = cap * _tanh(sc / cap)
            sc = tl.where(live[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            vt = tl.load(v + base + keys[:, None] * D + j[None, :], mask=used[:, None], other=0.0)
            if LOW:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            else:
                acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
    tl.store(acc_out + out[:, None] * D + j[None, :], acc, mask=in_group[:, None])
    tl.store(ml_out + out * 2, m_i, mask=in_group)
    tl.store(ml_out + out * 2 + 1, l_i, mask=in_group)


@triton.jit
def _combine(acc_in, ml_in, z, S, SP: tl.constexpr, D: tl.constexpr):
    rh = tl.program_id(0).to(tl.int64)        # row * heads + head
    s = tl.arange(0, SP)
    ok = s < S
    m = tl.load(ml_in + (rh * S + s) * 2, mask=ok, other=float("-inf"))
    l = tl.load(ml_in + (rh * S + s) * 2 + 1, mask=ok, other=0.0)
    top = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - tl.where(top == float("-inf"), 0.0, top)))
    j = tl.arange(0, D)
    acc = tl.load(acc_in + (rh * S + s)[:, None] * D + j[None, :], mask=ok[:, None], other=0.0)
    total = tl.sum(w * l, 0)
    o = tl.sum(w[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(z + rh * D + j, o.to(z.dtype.element_ty))


def supports(q: Tensor, k_cache: Tensor) -> bool:
    """Whether the kernels cover this step: one query position, power-of-two head size, a
    contiguous cache, heads that group evenly."""
    d = q.shape[-1]
    return (q.shape[1] == 1 and d >= 16 and d & (d - 1) == 0 and q.stride(-1) == 1
            and k_cache.is_contiguous() and q.shape[2] % k_cache.shape[1] == 0)


def decode_attention(q: Float[Tensor, "batch 1 head d_head"], k_cache: Float[Tensor, "batch kv_head cap d_head"],
                     v_cache: Float[Tensor, "batch kv_head cap d_head"], key_mask: Int[Tensor, "batch cap"],
                     at: Int[Tensor, " 1"], scale: float, *, cap: float | None = None,
                     window: int | None = None) -> Float[Tensor, "batch 1 head d_head"]:
    """softmax(q k^T * scale) v over the keys at positions 0..at (inclusive) whose `key_mask` is
    non-zero; `at` is read on the device. With `cap`, scores are soft-capped (`cap * tanh(s /
    cap)`, Gemma 2); with `window`, only the last `window` positions up to `at` are read (a
    sliding-window layer). The caller checks `supports(q, k_cache)`."""
    return _attend(q, k_cache, v_cache, key_mask, at, scale, None, cap, window)


def rotate_attend(q: Float[Tensor, "batch 1 head d_head"], k: Float[Tensor, "batch 1 kv_head d_head"],
                  v: Float[Tensor, "batch 1 kv_head d_head"], cos: Float[Tensor, "batch 1 1 d_head"],
                  sin: Float[Tensor, "batch 1 1 d_head"], k_cache: Float[Tensor, "batch kv_head cap d_head"],
                  v_cache: Float[Tensor, "batch kv_head cap d_head"], key_mask: Int[Tensor, "batch cap"],
                  at: Int[Tensor, " 1"], scale: float, *, cap: float | None = None,
                  window: int | None = None) -> Float[Tensor, "batch 1 head d_head"]:
    """`kernels.block.rotate_store` and `decode_attention` in one launch fewer: the unrotated q, k, v
    (consecutive heads of one projection's output: the caller checks `kernels.block.joined_views`
    and `supports`) are rotated inside the attention kernel, which also stores the new key and
    value at `at`. The same numbers as the two calls (the rotated q is not materialised, so a
    hook on `hook_rot_q` needs the two calls)."""
    d = q.shape[-1]
    cos, sin = cos.reshape(-1, d)[:len(q)].contiguous(), sin.reshape(-1, d)[:len(q)].contiguous()
    return _attend(q, k_cache, v_cache, key_mask, at, scale, (cos, sin), cap, window)


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_mask: Tensor, at: Tensor, scale: float,
            rotary: tuple[Tensor, Tensor] | None, cap: float | None, window: int | None) -> Tensor:
    b, _, hq, d = q.shape
    hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    slices = triton.cdiv(capacity, SLICE)
    acc = torch.empty((b, hq, slices, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b, hq, slices, 2), dtype=torch.float32, device=q.device)
    cos, sin = rotary if rotary is not None else (q, q)
    _partial[(b * hkv, slices)](q, q.stride(0), q.stride(2), k_cache, v_cache, k_cache.stride(0),
                                k_cache.stride(1), key_mask, key_mask.stride(0), at, acc, ml, scale, cos, sin,
                                float(cap or 1.0), int(window or 1 << 30), HKV=hkv, G=g,
                                GP=max(16, triton.next_power_of_2(g)), D=d, SLICE=SLICE, BLOCK=BLOCK, S=slices, num_warps=WARPS, num_stages=STAGES,
                                LOW=q.dtype in (torch.bfloat16, torch.float16) and not INTERPRETED,
                                ROTATE=rotary is not None, BF16=q.dtype == torch.bfloat16, CAP=cap is not None)
    z = torch.empty((b, 1, hq, d), dtype=q.dtype, device=q.device)
    _combine[(b * hq,)](acc, ml, z, S=slices, SP=max(2, triton.next_power_of_2(slices)), D=d, num_warps=1)
    return z
