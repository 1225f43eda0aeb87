"""Decode attention on this GPU, each candidate captured in a CUDA graph (as in the decode step) and
replayed: the Triton kernel (`isokl_tl.attn_triton`) over a grid of slice sizes, key blocks and
warps, at several cache fill levels, against SDPA over the whole cache.

    python benchmarks/tune_attention.py
"""

import itertools
import statistics
import time

import torch

from isokl_tl import attn_triton


def graph_us(fn, reps: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps // 10):
            g.replay()
        torch.cuda.synchronize()
        times.append(1e6 * (time.perf_counter() - start) / reps)
    return statistics.median(times)


def main() -> None:
    b, hq, hkv, d, cap = 128, 14, 2, 64, 560
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(b, cap, dtype=torch.long, device="cuda")
    bias = torch.zeros(b, 1, 1, cap, device="cuda", dtype=torch.bfloat16)
    at = torch.zeros(1, dtype=torch.long, device="cuda")
    sdpa = graph_us(lambda: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=bias, scale=0.125, enable_gqa=True))
    print(f"SDPA, whole cache of {cap}: {sdpa:.1f} us", flush=True)
    fills = (50, 300, 559)
    rows = []
    for sl, bl, w in itertools.product((64, 128, 256, 576), (32, 64), (1, 2, 4)):
        if bl > sl:
            continue
        attn_triton.SLICE, attn_triton.BLOCK, attn_triton.WARPS = sl, bl, w
        us = []
        for n in fills:
            at.fill_(n - 1)
            us.append(graph_us(lambda: attn_triton.decode_attention(q, k, v, mask, at, 0.125)))
        rows.append((statistics.mean(us), sl, bl, w, us))
        print(f"slice {sl:3d} block {bl:2d} warps {w}: " + ", ".join(f"{n} keys {u:.1f} us" for n, u in zip(fills, us)),
              flush=True)
    best = min(rows)
    print(f"best (mean over fills): slice {best[1]} block {best[2]} warps {best[3]}: {best[0]:.1f} us")


if __name__ == "__main__":
    main()
