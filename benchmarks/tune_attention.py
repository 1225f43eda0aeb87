"""Decode attention on this GPU, each candidate captured in a CUDA graph (as in the decode step) and
replayed: the Triton kernel (`isokl_tl.attn_triton`) over a grid of slice sizes, key blocks, warps
and pipeline depths, at several cache fill levels, against SDPA over the whole cache.

Each replay runs one attention per layer over that layer's own cache (24 caches, as in a decode
step), so the caches are read from memory, not from the L2 cache: timing one cache over and over
(this script's first version) keeps it in L2 and favours low-latency configurations.

    python benchmarks/tune_attention.py [--rows 128]
"""

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

from isokl_tl import attn_triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import graph_us  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--layers", type=int, default=24)
    a = ap.parse_args()
    b, hq, hkv, d, cap, n_layers = a.rows, 14, 2, 64, 560, a.layers
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    ks = [torch.randn(b, hkv, cap, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_layers)]
    vs = [torch.randn(b, hkv, cap, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_layers)]
    mask = torch.ones(b, cap, dtype=torch.long, device="cuda")
    bias = torch.zeros(b, 1, 1, cap, device="cuda", dtype=torch.bfloat16)
    at = torch.zeros(1, dtype=torch.long, device="cuda")

    def sdpa_all():
        for k, v in zip(ks, vs):
            torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=bias, scale=0.125,
                                                             enable_gqa=True)

    def ours_all():
        for k, v in zip(ks, vs):
            attn_triton.decode_attention(q, k, v, mask, at, 0.125)
    print(f"{b} rows, {n_layers} caches of {cap}: SDPA over the whole cache {graph_us(sdpa_all, n_layers):.1f} us",
          flush=True)
    fills = (100, 300, 500)
    rows = []
    for sl, bl, w, st in itertools.product((64, 128, 256), (32, 64, 128), (1, 2, 4), (2, 3, 4)):
        if bl > sl:
            continue
        attn_triton.SLICE, attn_triton.BLOCK, attn_triton.WARPS, attn_triton.STAGES = sl, bl, w, st
        us = []
        try:
            for n in fills:
                at.fill_(n - 1)
                us.append(graph_us(ours_all, n_layers))
        except Exception as e:                      # noqa: BLE001 (out of shared memory, ...)
            print(f"slice {sl} block {bl} warps {w} stages {st}: {type(e).__name__}", flush=True)
            continue
        rows.append((statistics.mean(us), sl, bl, w, st, us))
    rows.sort()
    for mean, sl, bl, w, st, us in rows[:8]:
        print(f"slice {sl:3d} block {bl:3d} warps {w} stages {st}: "
              + ", ".join(f"{n} keys {u:.1f} us" for n, u in zip(fills, us)), flush=True)
    for mean, sl, bl, w, st, us in rows:
        if (sl, bl, w, st) == (128, 32, 1, 3):
            print("session 4's choice: " + ", ".join(f"{n} keys {u:.1f} us" for n, u in zip(fills, us)))


if __name__ == "__main__":
    main()
