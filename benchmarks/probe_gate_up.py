"""Probe: a gated MLP's gate/up multiply with silu(gate) * up in the same Triton kernel
(`engine/kernels/gate_up.py`), against cuBLAS's multiply + `block.silu_mul`.

For a model shape (default the Qwen2.5-0.5B one of `bench_gpu.py`) and each row count (the
steered rows, and with their base partners), it captures one pass over the model's layers (one
distinct weight per layer, so the weights stream from memory as in a step) in a CUDA graph and
times its replay, for cuBLAS + `silu_mul` and for every tile configuration in the grid. It prints
us per layer for the baseline and the best configurations, and the largest difference of the
outputs.

With `--step`, the whole engine step follows (`probe_splitk.step`: the CUDA-graph decoder with and
without the kernel, alternating); with `--use-best`, under the best tiles the grid just found.

    python benchmarks/probe_gate_up.py [--shape qwen2.5-0.5b] [--rows 64 128] [--top 5] [--step [--use-best]]
"""

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_blas import graph_time  # noqa: E402
from probe_splitk import probe_args, step  # noqa: E402

from isokl_tl.engine.kernels import block, gate_up  # noqa: E402
from isokl_tl.models.checkpoints import SHAPES  # noqa: E402


def grid(rows: int):
    block_ms = (64,) if rows <= 64 else (64, 128)
    for bm, bn, bk, warps, stages in itertools.product(block_ms, (16, 32, 64, 128), (64, 128, 256), (4, 8), (3, 4, 5)):
        if stages * (bm + 2 * bn) * bk * 2 <= 200 * 1024 and bm * bn <= 64 * 128 and (bk < 256 or bn <= 64):
            yield bm, bn, bk, warps, stages


def main() -> None:
    a = probe_args("/tmp/isokl_probe_gate_up")
    best = {}
    shape = SHAPES[a.shape]
    d, d_mlp, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, shape {a.shape}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(2 * d_mlp, d, generator=g, **bf) * d ** -0.5 for _ in range(layers)]
    for rows in a.rows:
        x = torch.randn(rows, d, generator=g, **bf)
        h = torch.empty(rows, 2 * d_mlp, **bf)

        def base():
            for w in ws:
                torch.mm(x, w.T, out=h)
                out = block.silu_mul(*h.chunk(2, dim=-1))
            return out

        t_base = 1e6 * graph_time(base, 30) / layers
        ref = base()
        results = []
        for config in grid(rows):
            def fused(config=config):
                for w in ws:
                    out = gate_up.gate_up_silu(x, w, config)
                return out

            diff = float((fused().float() - ref.float()).abs().max())
            results.append((1e6 * graph_time(fused, 30) / layers, config, diff))
        results.sort()
        print(f"gate/up ({d} -> 2 x {d_mlp}), {rows} rows: cuBLAS + silu_mul {t_base:.2f} us per layer; "
              f"default tiles {gate_up.tiles(rows, d)}", flush=True)
        for t, config, diff in results[:a.top]:
            print(f"  fused {t:.2f} us  (block_m, block_n, block_k, warps, stages) = {config}, max |diff| {diff:.3g}",
                  flush=True)
        best[(rows <= 64, d)] = results[0][1] if results[0][0] < t_base else None
    if a.step:
        if a.use_best:
            gate_up.TILES.update(best)
            print(f"tiles for the step: {gate_up.TILES}", flush=True)
        step(a, "gate/up + silu fused", "cuBLAS + silu_mul", "gated")


if __name__ == "__main__":
    main()
