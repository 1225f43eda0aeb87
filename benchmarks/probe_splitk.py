"""Probe: a decode step's narrow projections as split-K Triton kernels, their pieces added by the
residual add + RMSNorm that follows (`engine/kernels/splitk.py`), against cuBLAS + `add_rms_norm`.

For each projection whose output the residual add reads (the attention output and the MLP's down
projection of a model shape, default the Qwen2.5-0.5B one of `bench_gpu.py`) and each row count
(the steered rows, and with their base partners), it captures one pass over the model's layers
(one distinct weight per layer, so the weights stream from memory as in a step) in a CUDA graph
and times its replay: cuBLAS's multiply then `block.add_rms_norm`, against `linear_parts` then
`add_parts_rms_norm` for every tile configuration in the grid. It prints us per layer for the
baseline and the best configurations, and the largest difference of the normalised outputs.

With `--step`, the whole engine step follows (`rollout` with the CUDA-graph decoder, batch +
partners, KL every token, on a random-init checkpoint of the shape), with and without the split-K
projections, alternating them; with `--use-best`, under the best tiles the grid just found.

    python benchmarks/probe_splitk.py [--shape qwen2.5-0.5b] [--rows 64 128] [--top 5] [--step [--use-best]]
"""

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_blas import graph_time  # noqa: E402

from isokl_tl.engine.kernels import block, splitk  # noqa: E402
from isokl_tl.models.checkpoints import SHAPES  # noqa: E402


def grid(rows: int, d_in: int):
    splits = (1, 2, 4, 8) if d_in <= 1024 else (2, 4, 8)
    block_ms = (64,) if rows <= 64 else (64, 128)
    for bm, bn, bk, split, warps in itertools.product(block_ms, (16, 32, 64), (64, 128), splits, (4, 8)):
        if bk * split <= 2 * d_in:
            yield bm, bn, bk, split, warps, 4


def probe_args(work: str) -> argparse.Namespace:
    """The options a kernel probe takes (this one's and `probe_gate_up.py`'s)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--step", action="store_true")
    ap.add_argument("--use-best", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=work)
    return ap.parse_args()


def main() -> None:
    a = probe_args("/tmp/isokl_probe_splitk")
    best = {}
    shape = SHAPES[a.shape]
    d, layers = shape["hidden_size"], shape["num_hidden_layers"]
    d_attn = shape["num_attention_heads"] * (d // shape["num_attention_heads"])
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, shape {a.shape}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    for name, d_in in (("o", d_attn), ("down", shape["intermediate_size"])):
        ws = [torch.randn(d, d_in, generator=g, **bf) * d_in ** -0.5 for _ in range(layers)]
        ln = 1 + 0.1 * torch.randn(d, generator=g, **bf)
        for rows in a.rows:
            x = torch.randn(rows, d_in, generator=g, **bf)
            resid = torch.randn(rows, d, generator=g, **bf)
            y = torch.empty(rows, d, **bf)

            def base():
                for w in ws:
                    torch.mm(x, w.T, out=y)
                    out = block.add_rms_norm(resid, y, ln, 1e-6)
                return out

            t_base = 1e6 * graph_time(base, 30) / layers
            ref = base()
            results = []
            for config in grid(rows, d_in):
                def fused(config=config):
                    for w in ws:
                        out = splitk.add_parts_rms_norm(resid, splitk.linear_parts(x, w, config), None, ln, 1e-6)
                    return out

                got = fused()
                diff = max(float((got[i].float() - ref[i].float()).abs().max()) for i in range(2))
                results.append((1e6 * graph_time(fused, 30) / layers, config, diff))
            results.sort()
            print(f"{name} ({d_in} -> {d}), {rows} rows: cuBLAS + add_rms_norm {t_base:.2f} us per layer; "
                  f"default tiles {splitk.tiles(rows, d_in)}", flush=True)
            for t, config, diff in results[:a.top]:
                print(f"  split-K {t:.2f} us  (block_m, block_n, block_k, split, warps, stages) = {config}, "
                      f"max |diff| {diff:.3g}", flush=True)
            best[(rows <= 64, d_in)] = results[0][1] if results[0][0] < t_base else None
    if a.step:
        if a.use_best:
            splitk.TILES.update(best)
            print(f"tiles for the step: {splitk.TILES}", flush=True)
        step(a, "split-K", "cuBLAS", "splitk")


def step(a, on: str, off: str, attr: str) -> None:
    """ms per engine step of the CUDA-graph decoder as it is (named `on`) and with its kernels
    attribute `attr` set to None (`off`: that kernel through cuBLAS instead), alternating."""
    from bench_gpu import build_checkpoint

    from isokl_tl.engine import GraphDecoder, pool
    from isokl_tl.hooks import hook_name
    from isokl_tl.models import load_model
    from isokl_tl.rollout import rollout

    class Without(GraphDecoder):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            setattr(self, attr, None)

    model = load_model(str(build_checkpoint(a.shape, Path(a.work) / "ckpt")), device="cuda", dtype="bfloat16")
    hook = hook_name(model.cfg.n_layers // 2)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.cfg.d_model, generator=g)
    v = v / v.norm()
    prompts = torch.randint(5, 600, (a.batch, 48), generator=g).tolist()
    c = torch.full((a.batch,), 4.0)
    kw = dict(direction=v, hook=hook, eos=[], rows_per_batch=a.batch)
    decoders = {on: GraphDecoder, off: Without}
    steps, runs = {k: [] for k in decoders}, {}
    for cls in decoders.values():               # warm-up: kernels compiled, graphs captured, decoders kept
        rollout(model, prompts, c, window=a.new, decoder=cls, **kw)
    for _ in range(a.repeats):
        for name, cls in decoders.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            runs[name] = rollout(model, prompts, c, window=a.new, decoder=cls, **kw)
            torch.cuda.synchronize()
            steps[name].append(1000 * (time.perf_counter() - t) / a.new)
    for name in decoders:
        print(f"engine step, {a.batch} rows + partners, {name}: {statistics.median(steps[name]):.3f} ms "
              f"({', '.join(f'{s:.3f}' for s in steps[name])})", flush=True)
    x, y = runs[on], runs[off]
    agree = (x.tokens == y.tokens).float().mean(1)
    print(f"rollouts: token agreement {float(agree.mean()):.4f} (rows identical: {int((agree == 1).sum())} of "
          f"{len(agree)}), first-token max |KL difference| {float((x.kl[:, 0] - y.kl[:, 0]).abs().max()):.3g}, "
          f"mean KL {float(x.kl.nanmean()):.4f} vs {float(y.kl.nanmean()):.4f}")
    pool.release(model)


if __name__ == "__main__":
    main()
