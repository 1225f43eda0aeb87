"""Probe: does the BLAS library torch picks change a GPU decode step?

torch sends bias-free bf16 matrix multiplies to cuBLAS or cuBLASLt
(`torch.backends.cuda.preferred_blas_library`), whose heuristics pick different kernels (split-K
or not) at a decode step's 64-128 rows. This probe times, for a model shape (default the
Qwen2.5-0.5B one of `bench_gpu.py`), each multiply of a step captured in a CUDA graph over one
weight per layer (so the weights stream from memory, as in a step), and then the whole engine
step (`rollout` with the CUDA-graph decoder, batch + partners, KL every token), under each
library, alternating them. It also checks that the rollouts agree.

    python benchmarks/probe_blas.py [--shape qwen2.5-0.5b] [--batch 64] [--new 512] [--repeats 3]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import build_checkpoint  # noqa: E402

from isokl_tl.models.checkpoints import SHAPES  # noqa: E402

LIBRARIES = ("cublas", "cublaslt")


def graph_time(fn, repeats: int = 20) -> float:
    """Seconds per replay of `fn` captured in a CUDA graph (median of `repeats` timed replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def multiplies(shape: dict, rows: int, layers: int) -> dict:
    """us per multiply of each kind, bias-free, one distinct weight per layer."""
    d, h, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head = d // h
    kinds = {"qkv": (d, (h + 2 * kv) * head), "o": (h * head, d),
             "gate_up": (d, 2 * shape["intermediate_size"]), "down": (shape["intermediate_size"], d)}
    out = {}
    for name, (k, n) in kinds.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)

        def run():
            for w in ws:
                torch.mm(x, w.T, out=y)
        out[name] = 1e6 * graph_time(run) / layers
        del ws
    w = torch.randn(shape["vocab_size"], d, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(rows, shape["vocab_size"], device="cuda", dtype=torch.bfloat16)
    out["unembed"] = 1e6 * graph_time(lambda: torch.mm(x, w.T, out=y))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/isokl_probe_blas")
    a = ap.parse_args()
    shape = dict(SHAPES[a.shape])
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, shape {a.shape}", flush=True)

    for rows in (a.batch, 2 * a.batch):
        for lib in LIBRARIES:
            torch.backends.cuda.preferred_blas_library(lib)
            us = multiplies(shape, rows, shape["num_hidden_layers"])
            print(f"multiplies, {rows} rows, {lib}: " + ", ".join(f"{k} {v:.2f} us" for k, v in us.items()),
                  flush=True)

    from isokl_tl.engine import GraphDecoder, pool
    from isokl_tl.hooks import hook_name
    from isokl_tl.models import load_model
    from isokl_tl.rollout import rollout

    model = load_model(str(build_checkpoint(a.shape, Path(a.work) / "ckpt")), device="cuda", dtype="bfloat16")
    hook = hook_name(model.cfg.n_layers // 2)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.cfg.d_model, generator=g)
    v = v / v.norm()
    prompts = torch.randint(5, 600, (a.batch, a.prompt_len), generator=g).tolist()
    c = torch.full((a.batch,), 4.0)
    kw = dict(direction=v, hook=hook, eos=[], rows_per_batch=a.batch, decoder=GraphDecoder)
    steps = {lib: [] for lib in LIBRARIES}
    runs = {}
    for lib in LIBRARIES:                       # warm-up: kernels compiled, a graph captured per library
        torch.backends.cuda.preferred_blas_library(lib)
        pool.release(model)
        rollout(model, prompts, c, window=16, **kw)
    for _ in range(a.repeats):
        for lib in LIBRARIES:
            torch.backends.cuda.preferred_blas_library(lib)
            pool.release(model)                 # captured again under this library
            rollout(model, prompts, c, window=a.new, **kw)
            torch.cuda.synchronize()
            t = time.perf_counter()
            runs[lib] = rollout(model, prompts, c, window=a.new, **kw)
            torch.cuda.synchronize()
            steps[lib].append(1000 * (time.perf_counter() - t) / a.new)
    for lib in LIBRARIES:
        print(f"engine step, {a.batch} rows + partners, {lib}: {statistics.median(steps[lib]):.3f} ms "
              f"({', '.join(f'{s:.3f}' for s in steps[lib])})", flush=True)
    x, y = runs["cublas"], runs["cublaslt"]
    print(f"rollouts: token agreement {float((x.tokens == y.tokens).float().mean()):.4f}, "
          f"max |KL difference| {float((x.kl - y.kl).abs().nan_to_num().max()):.3g}")


if __name__ == "__main__":
    main()
