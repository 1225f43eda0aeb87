"""How far a CPU run's stages are from what the machine can do: one `isokl-tl run` in this process
with its float32 multiplies (oneDNN's packed linear and `F.linear`) and its attention
(`F.scaled_dot_product_attention`) counted and timed, against the machine's own multiply rate and
memory bandwidth, measured first.

    python benchmarks/cpu_floor.py                      # issue 18's CPU command
    python benchmarks/cpu_floor.py --window 96 ...      # any `isokl-tl run` arguments instead

For each kind of work it prints the floating-point operations (multiplies) or bytes of keys and
values read (attention at one query per row, a decode step: it reads the whole cache for a few
products per byte, so memory bounds it), the time spent in it, the rate reached and the time the
machine's measured rate would need. What is left of the stages' time is everything else (norms,
rotary, scoring, Python). The wrapped calls add a few microseconds each.

Not counted: attention of the layers SDPA cannot run exactly (`engine.attention`: soft-capped or
sliding-window; the embedded model has none), and TransformerLens's own MLP modules where the fast
path does not join a block's projections (non-gated MLPs). Counted as multiplies: the one-time
packing of each weight into oneDNN's layout, done inside the first multiply by that weight.
"""

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ISSUE_COMMAND = ["--prompts", "eval", "--n-prompts", "12", "--window", "96", "--alphas", "0 0.5 1 2 4",
                 "--fork-every", "16", "--calib-window", "32"]


def best_of(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine() -> tuple[float, float]:
    """(float32 multiply rate in FLOP/s, memory read bandwidth in bytes/s): the packed oneDNN linear
    on a decode-step-sized multiply (128 rows x the embedded model's gate/up weight, 576 -> 3072),
    and the sum of a 1 GiB tensor."""
    from isokl_tl.engine import cpu_linear

    w = torch.randn(3072, 576)
    x = torch.randn(128, 576)
    rate = 0.0
    if cpu_linear.available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, cpu_linear.BATCH_HINT)
        rate = 2 * 128 * 3072 * 576 / best_of(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none",
                                                                                          [], ""))
    rate = max(rate, 2 * 128 * 3072 * 576 / best_of(lambda: F.linear(x, w)))
    big = torch.randn(1 << 28)
    return rate, big.numel() * 4 / best_of(big.sum, 3)


class Counter:
    """Wraps the multiplies and attention of the library's CPU paths, counting and timing them."""

    def __init__(self):
        self.work = {"multiplies": [0, 0.0], "attention, one query (bytes)": [0, 0.0],
                     "attention, prefill and forks": [0, 0.0]}

    def install(self) -> None:
        from isokl_tl.engine import cpu_linear, fast

        packed, linear, sdpa = cpu_linear.Packer.linear, F.linear, F.scaled_dot_product_attention

        inside = []                           # a packed linear that falls back to F.linear counts once

        def timed(kind, amount, fn, *a, **k):
            if inside:
                return fn(*a, **k)
            inside.append(kind)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                entry = self.work[kind]
                entry[0] += amount
                entry[1] += time.perf_counter() - t
                inside.pop()

        def flops(x, w):
            return 2 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]

        def packer_linear(self_, x, w, b=None):
            return timed("multiplies", flops(x, w), packed, self_, x, w, b)

        def f_linear(x, w, b=None):
            return timed("multiplies", flops(x, w), linear, x, w, b)

        def attention(q, k, v, **kw):
            if q.shape[-2] == 1:             # bytes of keys and values read
                return timed("attention, one query (bytes)", 2 * k.numel() * k.element_size(), sdpa, q, k, v, **kw)
            return timed("attention, prefill and forks", 4 * q.numel() * k.shape[-2], sdpa, q, k, v, **kw)

        cpu_linear.Packer.linear = packer_linear
        F.linear = f_linear                   # TransformerLens's own modules (the direction stage)
        fast.F.scaled_dot_product_attention = attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _, extra = ap.parse_known_args()
    args = extra or ISSUE_COMMAND
    from isokl_tl_cli.startup import import_library

    import_library()                          # as a command does: freed memory kept, the import frozen
    torch.manual_seed(0)
    rate, bandwidth = machine()
    print(f"machine: float32 multiplies {rate / 1e9:.0f} GFLOP/s, memory read {bandwidth / 1e9:.1f} GB/s, "
          f"{torch.get_num_threads()} threads")
    counter = Counter()
    counter.install()
    from isokl_tl_cli.main import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sys.argv = ["isokl-tl", "run", *args, "--out", str(out)]
        with contextlib.redirect_stdout(io.StringIO()):     # the run's summary
            cli(standalone_mode=False)
        stages = {k: v["seconds"] for k, v in json.loads((out / "manifest.json").read_text())["stages"].items()}
    total = sum(stages.values())
    print(f"\nisokl-tl run {' '.join(args)}")
    print(f"stages {total:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    print(f"{'work':32s} {'amount':>12s} {'seconds':>8s} {'rate':>14s} {'at the machine':>15s}")
    spent = 0.0
    for kind, (amount, seconds) in counter.work.items():
        spent += seconds
        if "bytes" in kind:
            print(f"{kind:32s} {amount / 1e9:9.1f} GB {seconds:8.1f} {amount / max(seconds, 1e-9) / 1e9:9.1f} GB/s "
                  f"{amount / bandwidth:13.1f} s")
        else:
            print(f"{kind:32s} {amount / 1e12:7.2f} TFLOP {seconds:8.1f} {amount / max(seconds, 1e-9) / 1e9:7.0f} GFLOP/s "
                  f"{amount / rate:13.1f} s")
    print(f"{'everything else':32s} {'':>12s} {total - spent:8.1f}")


if __name__ == "__main__":
    main()
