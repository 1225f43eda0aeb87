"""A gated MLP's hidden layer, silu(x @ W_gate.T) * (x @ W_up.T), as one Triton kernel for a
decode step's few rows.

The fast decoders store the gate and input projections as one [2 d_mlp, d_model] weight
(`engine.fusion.join`); cuBLAS multiplies it into a [rows, 2 d_mlp] result and a second launch
(`kernels.block.silu_mul`) reads both halves back to write silu(gate) * up. Here each program
multiplies the same columns of both halves (two accumulators) and writes their product, so the
[rows, 2 d_mlp] intermediate is never stored and the step has one launch fewer per block.

Rounding follows the unfused path: each projection's float32 sum is rounded to the model's dtype
(as `F.linear` returns it), then the activation, then the product (as `silu_mul` rounds them).
The sums run in another order than cuBLAS's, so gate or up can differ from `F.linear`'s in the
last bit. The engine uses the kernel for bfloat16 models with at most `MAX_ROWS` rows where
`TILES` was measured (`FastDecoder.__init__`); it also takes float32 (IEEE float32 products, not
TF32), which the tests run through Triton's interpreter (TRITON_INTERPRET=1 before importing).
"""

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor

from isokl_tl.engine.kernels.block import _round
from isokl_tl.engine.kernels.splitk import INTERPRETED, MAX_ROWS
from isokl_tl.engine.kernels.tiling import fit_stages, nearest


@triton.jit
def _gate_up_silu(x, w, out, M, N, K, x_stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr, BF16: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)     # the row tiles of one weight tile run side by side
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_gate = w + rn[None, :].to(tl.int64) * K           # rows [0, N) of the joined weight
    w_up = w + (N + rn[None, :]).to(tl.int64) * K        # rows [N, 2N)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x + rm[:, None].to(tl.int64) * x_stride + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        ok = (rn[None, :] < N) & (rk[:, None] < K)
        bg = tl.load(w_gate + rk[:, None], mask=ok, other=0.0)
        bu = tl.load(w_up + rk[:, None], mask=ok, other=0.0)
        if WIDEN:                              # the interpreter: exact products of the bf16 inputs
            a = a.to(tl.float32)
            gate += tl.dot(a, bg.to(tl.float32), input_precision="ieee")
            up += tl.dot(a, bu.to(tl.float32), input_precision="ieee")
        elif IEEE:
            gate += tl.dot(a, bg, input_precision="ieee")
            up += tl.dot(a, bu, input_precision="ieee")
        else:
            gate += tl.dot(a, bg)
            up += tl.dot(a, bu)
    g, u = _round(gate, BF16), _round(up, BF16)          # the two projections as F.linear returns them
    act = _round(g / (1.0 + tl.exp(-g)), BF16)           # then as `silu_mul` rounds
    y = _round(act * u, BF16)
    dst = out + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(dst, y.to(out.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


# (block_m, block_n, block_k, warps, stages) per (rows <= 64, d_model), from
# `benchmarks/probe_gate_up.py` on an H200 (us per layer, against cuBLAS + `silu_mul`), or None
# where cuBLAS was faster; any other shape takes the nearest d_model's.
TILES = {
    (True, 576): (64, 16, 128, 4, 4),         # 4.7 against 6.3
    (False, 576): (64, 32, 64, 4, 5),         # 5.2 against 6.4
    (True, 896): (64, 64, 128, 4, 4),         # 8.8-8.9 against 9.9
    (False, 896): None,                       # 11.0-11.3 against cuBLAS's 10.4-10.5
    (True, 2048): (64, 64, 128, 4, 4),        # 20.4 against 22.1
    (False, 2048): (128, 64, 64, 8, 5),       # 22.8 against 24.7
}


def tiles(rows: int, d_model: int, element_size: int = 2, device: torch.device | None = None
          ) -> tuple[int, int, int, int, int] | None:
    """The tiles for `rows` x `d_model` from `TILES`, with as many stages as `device` holds
    (`tiling.fit_stages`); None for cuBLAS, or where two stages would not fit."""
    config = nearest(TILES, rows, d_model)
    if config is None:
        return None
    block_m, block_n, block_k, warps, stages = config
    stages = fit_stages(stages, (block_m + 2 * block_n) * block_k * element_size, device)   # x's tile, two w's
    return None if stages is None else (block_m, block_n, block_k, warps, stages)


def gate_up_silu(x: Float[Tensor, "*batch d_model"], w: Float[Tensor, "two_d_mlp d_model"],
                 config: tuple[int, int, int, int, int] | None = None) -> Float[Tensor, "*batch d_mlp"] | None:
    """silu(gate) * up with gate, up = F.linear(x, w).chunk(2, -1); or None (the caller then uses
    cuBLAS and `silu_mul`) for more than `MAX_ROWS` rows, x and w not both bfloat16 or both
    float32 on one device, w not contiguous, or a shape whose `tiles` are cuBLAS's. `config`: (block_m, block_n, block_k,
    warps, stages), else `tiles`."""
    k = x.shape[-1]
    rows = x.numel() // k
    if (rows > MAX_ROWS or x.dtype != w.dtype or x.dtype not in (torch.bfloat16, torch.float32)
            or x.device != w.device or not w.is_contiguous() or w.shape[0] % 2):
        return None
    if w.shape[1] != k:
        raise ValueError(f"gate_up_silu: x has {k} features, the weight {w.shape[1]}")
    config = config or tiles(rows, k, w.element_size(), w.device)
    if config is None:
        return None
    x2 = x.reshape(rows, k)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    n = w.shape[0] // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages = config
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n))
    _gate_up_silu[grid](x2, w, out, rows, n, k, x2.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                        IEEE=x.dtype == torch.float32, WIDEN=INTERPRETED and x.dtype != torch.float32,
                        BF16=x.dtype == torch.bfloat16, num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)
