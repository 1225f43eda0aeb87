"""Candidates for a faster GPU decode step, timed in CUDA graphs on the decode shapes:

1. the scoring kernel (`isokl_tl.score_triton`) over [rows, 151936] bf16 logits, by split, block, warps;
2. the MLP's gate/up projection and silu(gate) * up as one Triton matrix multiply (silu-mul in
   its epilogue) against cuBLAS + the `silu_mul` kernel, by tile and pipeline depth.

    python benchmarks/tune_mlp_scoring.py
"""

import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import graph_us as _graph_us  # noqa: E402


def graph_us(fn) -> float:
    """Microseconds per call, ten calls to a captured graph (`timing.graph_us`)."""
    return _graph_us(lambda: [fn() for _ in range(10)], calls=10, reps=50)


@triton.jit
def _gate_up_silu(x, w, out, M, K: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    """out[m, n] = silu(x @ w[n].T) * (x @ w[N + n].T), each product rounded to bf16 first."""
    pn = tl.program_id(0)
    pm = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc_g = tl.zeros((BM, BN), tl.float32)
    acc_u = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        a = tl.load(x + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        wg = tl.load(w + rn[None, :].to(tl.int64) * K + (k + rk)[:, None])
        wu = tl.load(w + (N + rn)[None, :].to(tl.int64) * K + (k + rk)[:, None])
        acc_g = tl.dot(a, wg, acc_g)
        acc_u = tl.dot(a, wu, acc_u)
    g = acc_g.to(tl.bfloat16).to(tl.float32)
    u = acc_u.to(tl.bfloat16).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32)
    tl.store(out + rm[:, None] * N + rn[None, :], (act * u).to(tl.bfloat16), mask=rm[:, None] < M)


def scoring() -> None:
    from isokl_tl import score_triton as st
    v = 151936
    for rows in (128,):
        b = rows // 2
        logits = torch.randn(rows, v, device="cuda", dtype=torch.bfloat16) * 3
        base_row = torch.arange(b, rows, device="cuda")
        ref = st.greedy_scores_triton(logits, base_row)
        print(f"scoring {b} pairs: current {graph_us(lambda: st.greedy_scores_triton(logits, base_row)):.1f} us",
              flush=True)
        best = []
        for split, block, warps in itertools.product((16, 32, 64, 128), (1024, 2048, 4096), (4, 8, 16)):
            st.SPLIT, st.BLOCK = split, block
            orig = st._partials.run

            def run(*a, **k):
                k["num_warps"] = warps
                return orig(*a, **k)
            st._partials.run = run
            try:
                out = st.greedy_scores_triton(logits, base_row)
                same = bool((out[0] == ref[0]).all()) and float((out[1] - ref[1]).abs().max()) < 1e-4
                t = graph_us(lambda: st.greedy_scores_triton(logits, base_row))
                best.append((t, split, block, warps, same))
            except Exception as e:   # noqa: BLE001
                print(split, block, warps, "failed", type(e).__name__)
            finally:
                st._partials.run = orig
        for t, split, block, warps, same in sorted(best)[:6]:
            print(f"  split {split:4d} block {block:5d} warps {warps:2d}: {t:6.1f} us  same={same}")


def gate_up() -> None:
    from isokl_tl.block_triton import silu_mul
    d, n = 896, 4864
    w = torch.randn(2 * n, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5
    for m in (64, 128):
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)

        def ref():
            gu = torch.nn.functional.linear(x, w)
            return silu_mul(gu[:, :n], gu[:, n:])
        r = ref()
        t_ref = graph_us(ref)
        t_mm = graph_us(lambda: torch.nn.functional.linear(x, w))
        print(f"gate/up M={m}: cuBLAS {t_mm:.2f} us + silu_mul = {t_ref:.2f} us", flush=True)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        res = []
        for bm, bn, bk, warps, stages in itertools.product((64, 128), (32, 64, 128), (64, 128), (4, 8), (3, 4, 5)):
            if bm > m:
                continue

            def fused():
                _gate_up_silu[(n // bn, triton.cdiv(m, bm))](x, w, out, m, K=d, N=n, BM=bm, BN=bn, BK=bk,
                                                            num_warps=warps, num_stages=stages)
            try:
                fused()
                diff = (out.float() - r.float()).abs()
                res.append((graph_us(fused), bm, bn, bk, warps, stages, float((diff > 0).float().mean()),
                            float(diff.max())))
            except Exception as e:   # noqa: BLE001
                print(bm, bn, bk, warps, stages, "failed", type(e).__name__)
        for t, bm, bn, bk, warps, stages, frac, mx in sorted(res)[:6]:
            print(f"  BM {bm:3d} BN {bn:3d} BK {bk:3d} warps {warps} stages {stages}: {t:6.2f} us "
                  f"(differs {100 * frac:.2f}% of elements, max {mx:.3g})")


if __name__ == "__main__":
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    scoring()
    gate_up()
