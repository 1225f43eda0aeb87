"""What the GPU tuning and probing scripts share: timing a piece of work the way the decode step
runs it, captured once in a CUDA graph and replayed (`graph_us`), and the steered model the
decode-step probes run (`steered_model`)."""

import statistics
import time
from pathlib import Path

import torch


def graph_us(fn, calls: int = 1, reps: int = 20, rounds: int = 5) -> float:
    """Microseconds per call: `fn` (which makes `calls` calls of the thing timed) is run once,
    captured in a CUDA graph, and the graph replayed `reps` times per round; median of the rounds."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
        times.append(1e6 * (time.perf_counter() - start) / reps / calls)
    return statistics.median(times)


def steered_model(shape: str, rows: int = 128, layer: int = 14, coeff: float = 3.0):
    """(model, prompts, steering): a random-init bf16 model of `shape` (`bench_gpu.SHAPES`) on CUDA,
    `rows` random 48-token prompts, and the steering context manager (a random unit direction at
    `blocks.{layer}.hook_resid_post`, coefficient `coeff` on every row), not yet entered."""
    from bench_gpu import build_checkpoint
    from isokl_tl.hooks import hook_name, steer
    from isokl_tl.models import load_model

    model = load_model(str(build_checkpoint(shape, Path("/tmp/isokl_step/ckpt"))), device="cuda", dtype="bfloat16")
    tokens = torch.randint(5, 600, (rows, 48), device="cuda")
    v = torch.randn(model.cfg.d_model)
    return model, tokens, steer(model, hook_name(layer), v / v.norm(), torch.full((rows,), coeff, device="cuda"))
