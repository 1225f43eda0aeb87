"""A rollout's fixed cost and its per-step cost on the GPU: the engine (`rollout`, CUDA-graph path,
Qwen2.5-0.5B shape, bf16, 64 steered rows + base partners, 48-token prompts, hook at block 14) timed
at several windows, 3 repeats each (the first of each window also compiles kernels for the new cache
size; the Triton kernels compiled during each window's rollouts are listed). The difference between
windows is the per-step cost; what a window-8 rollout takes is about the fixed cost (prefill, one
eager step, the graph capture).

    python benchmarks/gpu_rollout_windows.py [--windows 8 512] [--repeats 3]
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import build_checkpoint, sync_time  # noqa: E402


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 64, 256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from isokl_tl.hooks import hook_name
    from isokl_tl.models import load_model
    from isokl_tl.rollout import rollout

    model = load_model(str(build_checkpoint("qwen2.5-0.5b", Path("/tmp/isokl_windows/ckpt"))), device="cuda",
                       dtype="bfloat16")
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.cfg.d_model, generator=g)
    v = v / v.norm()
    prompts = torch.randint(5, 600, (64, 48), generator=g).tolist()
    c = torch.full((64,), 3.0)
    kw = dict(direction=v, hook=hook_name(14), eos=[], rows_per_batch=64)
    compiles = _count_compiles()
    rollout(model, prompts, c, window=16, **kw)                    # warm-up
    for w in a.windows:
        compiles.clear()
        ts = [sync_time(lambda: rollout(model, prompts, c, window=w, **kw)) for _ in range(a.repeats)]
        print(f"window {w:4d}: ms per rollout {', '.join(f'{1000 * t:.1f}' for t in ts)}; "
              f"median per step {1000 * statistics.median(ts) / w:.3f}; Triton compiles "
              f"{', '.join(f'{n} {1000 * t:.0f} ms' for n, t in compiles) or 'none'}", flush=True)


def _count_compiles() -> list:
    """A list that collects (kernel, seconds) for every Triton compilation from now on."""
    import time
    from triton.runtime.jit import JITFunction

    seen, compile_ = [], JITFunction._do_compile

    def counted(self, *args, **kwargs):
        start = time.perf_counter()
        out = compile_(self, *args, **kwargs)
        seen.append((self.__name__, time.perf_counter() - start))
        return out
    JITFunction._do_compile = counted
    return seen


if __name__ == "__main__":
    main()
