"""Where the time of one GPU decode step goes: the captured forward step alone, the per-step scoring
(log-softmax, KL, argmax) alone, as PyTorch ops and as one Triton kernel, and the kernels of one eager step (count and top by GPU time).

    python benchmarks/profile_gpu_step.py --shape qwen2.5-0.5b
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def steered_model(shape: str, rows: int = 128, layer: int = 14, coeff: float = 3.0):
    """(model, prompts, steering): a random-init bf16 model of `shape` (`isokl_tl.models.checkpoints.SHAPES`) on CUDA,
    `rows` random 48-token prompts, and the steering context manager (a random unit direction at
    `blocks.{layer}.hook_resid_post`, coefficient `coeff` on every row), not yet entered."""
    from bench_gpu import build_checkpoint

    from isokl_tl.hooks import hook_name, steer
    from isokl_tl.models import load_model

    model = load_model(str(build_checkpoint(shape, Path("/tmp/isokl_step/ckpt"))), device="cuda", dtype="bfloat16")
    tokens = torch.randint(5, 600, (rows, 48), device="cuda")
    v = torch.randn(model.cfg.d_model)
    return model, tokens, steer(model, hook_name(layer), v / v.norm(), torch.full((rows,), coeff, device="cuda"))


def timed(fn, n=50) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=560)
    a = ap.parse_args()
    from isokl_tl.engine import GraphDecoder
    from isokl_tl.engine.scoring import greedy_scores, greedy_scores_torch

    model, tokens, steering = steered_model(a.shape, rows=2 * a.batch)
    with torch.no_grad(), steering as s:
        dec = GraphDecoder(model, s, a.capacity)
        logits = dec.prefill(tokens, torch.ones_like(tokens))
        nxt = logits.argmax(-1)
        dec.step(nxt)
        dec.step(nxt)                      # captured now

        def replay():
            dec.length -= 1
            dec.pos_ids -= 1
            dec.step(nxt)
        print(f"graph step replay: {timed(replay):.3f} ms")

        def eager():
            dec.length -= 1
            dec.pos_ids -= 1
            dec._static_step()
        print(f"eager static step: {timed(eager):.3f} ms")

        base_row = torch.arange(a.batch, 2 * a.batch, device="cuda")
        print(f"scoring, PyTorch ops: {timed(lambda: greedy_scores_torch(logits, base_row)):.3f} ms")
        print(f"scoring, Triton kernel: {timed(lambda: greedy_scores(logits, base_row)):.3f} ms")

        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        n_kernels = sum(e.count for e in events)
        print(f"kernels in one eager step: {n_kernels}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
