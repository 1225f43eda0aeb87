"""Large batches on the GPU: the CUDA-graph decoder's step time, steered tokens per second (each
with its per-token KL against a base partner) and peak memory at several batch sizes, for a
random-init model of a named shape in bf16; with the device memory `engine.batching` expects
such a batch to take (its per-row bound, plus the weights) and the rows per batch it would pick.

    python benchmarks/bench_batches.py --shape qwen2.5-0.5b --batches 64,128,256,512,1024
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from isokl_tl.engine import GraphDecoder, batch_rows, batching, release
from isokl_tl.hooks import hook_name
from isokl_tl.models import load_model
from isokl_tl.models.checkpoints import SHAPES, make_checkpoint
from isokl_tl.rollout import rollout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES))
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default="/tmp/isokl_batches")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    spec = dict(SHAPES[a.shape])
    ckpt = make_checkpoint(spec.pop("family"), work / "ckpt", seed=0, dtype=torch.bfloat16,
                           max_position_embeddings=4096, initializer_range=0.05, **spec)
    model = load_model(str(ckpt), device="cuda", dtype="bfloat16")
    hook = hook_name(model.cfg.n_layers // 2)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.cfg.d_model, generator=g)
    v = v / v.norm()
    print(f"{a.shape}, bf16, {torch.cuda.get_device_name()}, {a.new} new tokens, prompts of {a.prompt_len}")
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    per_row = batching.row_bytes(model, a.prompt_len, a.prompt_len + a.new)
    print("| steered rows (+ partners) | ms per step | steered tokens/s | peak memory GiB | expected at most GiB |")
    print("|---:|---:|---:|---:|---:|")
    for b in (int(x) for x in a.batches.split(",")):
        prompts = torch.randint(5, 600, (b, a.prompt_len), generator=g).tolist()
        coeff = torch.full((b,), 8.0)
        kw = dict(direction=v, hook=hook, window=a.new, eos=[], decoder=GraphDecoder, rows_per_batch=b)
        rollout(model, prompts, coeff, **kw)                  # warm-up: kernels, capture
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(a.repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            rollout(model, prompts, coeff, **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        secs = statistics.median(times)
        print(f"| {b} (+{b}) | {1000 * secs / a.new:.3f} | {b * a.new / secs:,.0f} | "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} | {(weights + b * per_row) / 2**30:.2f} |", flush=True)
        release(model)
    for n in (64, 512, 4096):
        prompts = [[5] * a.prompt_len] * n
        print(f"rows per batch the engine picks for {n} rows of this shape: {batch_rows(model, prompts, a.new)} "
              f"(its budget: {batching.budget_bytes(model) / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
