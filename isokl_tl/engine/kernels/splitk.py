"""A decode step's narrow matrix multiplies as split-K Triton kernels, their sum fused into the
residual add + RMSNorm that reads it.

At a decode step's 64-128 rows, the output projection ([rows, H*d_head] @ [H*d_head, d_model]) and
the MLP's down projection ([rows, d_mlp] @ [d_mlp, d_model]) have few output tiles and a long
reduction: cuBLAS splits the reduction and launches a second kernel to add the pieces, so the
down projection of the Qwen2.5-0.5B shape streams its 8.7 MB of weights at under 1 TB/s
(`benchmarks/probe_blas.py`). Here `linear_parts` computes the pieces (float32, [split, rows,
d_out]) in one launch, and `add_parts_rms_norm` adds them, rounds the sum to the model's dtype
(the projection's output, as `F.linear` would return it), adds it to the residual and normalises:
the launch that would have added the residual adds the pieces too.

The sum's order differs from cuBLAS's, so the projection's output can differ from `F.linear`'s in
its last bit (both accumulate in float32 and round once). The engine uses them for bfloat16
models with at most `MAX_ROWS` rows, where `TILES` was measured (`project_add_rms_norm`, called by
`FastDecoder._project_add_norm`); the
kernels also take float32 (exact IEEE products, not TF32), which the tests run. Set
TRITON_INTERPRET=1 before importing to run them on CPU tensors.
"""

import os

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor

from isokl_tl.engine.kernels.block import _add_then_norm, _round
from isokl_tl.engine.kernels.tiling import fit_stages, nearest

MAX_ROWS = 128        # the most rows `project_add_rms_norm` takes (decode steps: where `TILES` was measured)

# Triton's CPU interpreter multiplies bfloat16 blocks wrongly (triton 3.9: errors of 1e10), so
# there the kernel widens them to float32 first: their products are exact in float32 either way.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _linear_parts(x, w, parts, M, N, K, x_stride, K_PER: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr):
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = pid_s * K_PER
    for k0 in range(0, K_PER, BLOCK_K):
        rk = start + k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x + rm[:, None].to(tl.int64) * x_stride + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(w + rn[None, :].to(tl.int64) * K + rk[:, None],
                    mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
        if WIDEN:                              # the interpreter: exact products of the bf16 inputs
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    out = parts + pid_s.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(out, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


# (block_m, block_n, block_k, split, warps, stages) per (rows <= 64, d_in), from
# `benchmarks/probe_splitk.py` on an H200 for the SmolLM2-135M, Qwen2.5-0.5B and Llama-3.2-1B
# shapes (us per layer, against cuBLAS + `add_rms_norm`), or None where cuBLAS was faster; any
# other shape takes the nearest d_in's.
TILES = {
    (True, 576): (64, 16, 64, 4, 4, 4),       # 4.7 against 4.9
    (False, 576): (64, 16, 128, 1, 4, 4),     # 4.9 against 5.1
    (True, 896): (64, 16, 128, 1, 4, 4),      # 5.5 against 6.4
    (False, 896): None,                       # 6.2 against cuBLAS's 5.9
    (True, 1536): (64, 32, 128, 4, 4, 4),     # 6.2 against 7.1
    (False, 1536): (64, 32, 128, 2, 4, 4),    # 6.8 against 7.3
    (True, 2048): (64, 64, 128, 4, 4, 4),     # 8.3 against 8.8
    (False, 2048): None,                      # 9.5 against cuBLAS's 9.3
    (True, 4864): (64, 32, 128, 4, 4, 4),     # 9.2 against 10.6-11.0
    (False, 4864): (64, 64, 128, 4, 4, 4),    # 10.5 against 11.0-11.5
    (True, 8192): (64, 32, 128, 4, 4, 4),     # 15.7 against 17.3
    (False, 8192): (128, 64, 128, 4, 8, 4),   # 18.0 against 20.1
}


def tiles(rows: int, d_in: int, element_size: int = 2, device: torch.device | None = None
          ) -> tuple[int, int, int, int, int, int] | None:
    """The tiles for `rows` x `d_in` from `TILES`, with as many stages as `device` holds
    (`tiling.fit_stages`); None for cuBLAS, or where even two stages would not fit."""
    config = nearest(TILES, rows, d_in)
    if config is None:
        return None
    block_m, block_n, block_k, split, warps, stages = config
    stages = fit_stages(stages, (block_m + block_n) * block_k * element_size, device)     # x's tile, w's
    return None if stages is None else (block_m, block_n, block_k, split, warps, stages)


def project_add_rms_norm(a: Float[Tensor, "*batch d"], x: Float[Tensor, "*batch d_in"], w: Float[Tensor, "d d_in"],
                         bias: Float[Tensor, " d"] | None, norm_w: Float[Tensor, " d"], eps: float
                         ) -> tuple[Tensor, Tensor] | None:
    """(a + F.linear(x, w, bias), then rms_norm of it * norm_w) as `linear_parts` and
    `add_parts_rms_norm`; or None (the caller then uses cuBLAS and `block.add_rms_norm`) for more
    than `MAX_ROWS` rows, operands not of one dtype or not contiguous, or a shape whose `tiles`
    are cuBLAS's."""
    rows = x.numel() // x.shape[-1]
    operands = (a, x, w, norm_w) + (() if bias is None else (bias,))
    if (rows > MAX_ROWS or any(t.dtype != a.dtype for t in operands)
            or not all(t.is_contiguous() for t in (a, w, norm_w) + (() if bias is None else (bias,)))):
        return None
    config = tiles(rows, x.shape[-1], w.element_size(), w.device)
    if config is None:
        return None
    parts = linear_parts(x.reshape(rows, x.shape[-1]), w, config)
    total, normed = add_parts_rms_norm(a.reshape(rows, -1), parts, bias, norm_w, eps)
    return total.view(a.shape), normed.view(a.shape)


def linear_parts(x: Float[Tensor, "rows d_in"], w: Float[Tensor, "d_out d_in"],
                 config: tuple[int, int, int, int, int, int] | None = None) -> Float[Tensor, "split rows d_out"]:
    """x @ w.T as `split` float32 pieces over ranges of d_in (their sum is the product). `x`'s rows
    may be strided; `w` is contiguous. `config`: (block_m, block_n, block_k, split, warps,
    stages), else `tiles`."""
    if not w.is_contiguous():
        raise ValueError("linear_parts needs a contiguous weight")
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    config = config or tiles(m, k, x.element_size(), x.device)
    if config is None:
        raise ValueError(f"no split-K tiles for {m} x {k} on {x.device} (`tiles`): use F.linear")
    block_m, block_n, block_k, split, warps, stages = config
    k_per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per)
    parts = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))
    _linear_parts[grid](x, w, parts, m, n, k, x.stride(0), K_PER=k_per, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, IEEE=x.dtype == torch.float32, WIDEN=INTERPRETED and x.dtype != torch.float32,
                        num_warps=warps, num_stages=stages)
    return parts


@triton.jit
def _add_parts_rms_norm(a, parts, split, bias, w, total, normed, eps, M, N: tl.constexpr,
                        BLOCK: tl.constexpr, BF16: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    d = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split):
        d += tl.load(parts + (s * M + row) * N + offs, mask=ok, other=0.0)
    if HAS_BIAS:                               # added before the one rounding, as `F.linear` adds it
        d += tl.load(bias + offs, mask=ok, other=0.0).to(tl.float32)
    d = _round(d, BF16)                        # the projection's output in the model's dtype
    _add_then_norm(a, d, w, total, normed, eps, row, offs, ok, N, BF16)


def add_parts_rms_norm(a: Float[Tensor, "rows d"], parts: Float[Tensor, "split rows d"],
                       bias: Float[Tensor, " d"] | None, w: Float[Tensor, " d"], eps: float
                       ) -> tuple[Tensor, Tensor]:
    """(a + delta, rms_norm(a + delta) * w) where delta = sum of `parts` + `bias`, rounded to a's
    dtype: `add_rms_norm(a, F.linear(...), w, eps)` with the projection's pieces added here."""
    m, n = a.shape
    total, normed = torch.empty_like(a), torch.empty_like(a)
    _add_parts_rms_norm[(m,)](a, parts, parts.shape[0], a if bias is None else bias, w, total, normed, eps, m,
                              N=n, BLOCK=triton.next_power_of_2(n), BF16=a.dtype == torch.bfloat16,
                              HAS_BIAS=bias is not None, num_warps=4)
    return total, normed
