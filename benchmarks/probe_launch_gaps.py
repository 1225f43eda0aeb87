"""Where a captured decode step's time goes between kernels: the trace of one CUDA-graph replay
(kernel durations, the gaps between them), and what programmatic dependent launch (PDL) saves on
a chain of small Triton kernels in a CUDA graph, after Triton kernels and after cuBLAS ones.

    python benchmarks/probe_launch_gaps.py --shape qwen2.5-0.5b
"""

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import graph_us, steered_model  # noqa: E402


@triton.jit
def _axpy(x, y, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if PDL:
        tl.extra.cuda.gdc_wait()
    a = tl.load(x + offs, mask=offs < n)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(y + offs, a * 1.0001 + 1.0, mask=offs < n)


def pdl_probe() -> None:
    n = 128 * 896
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    w = torch.randn(896, 1152, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(128, 896, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(128, 1152, device="cuda", dtype=torch.bfloat16)
    grid = (triton.cdiv(n, 1024),)
    for pdl in (False, True):
        def chain():
            for _ in range(100):
                _axpy[grid](x, y, n, BLOCK=1024, PDL=pdl, launch_pdl=pdl)
                _axpy[grid](y, x, n, BLOCK=1024, PDL=pdl, launch_pdl=pdl)
        def mixed():
            for _ in range(100):
                torch.mm(a, w, out=out)
                _axpy[grid](x, y, n, BLOCK=1024, PDL=pdl, launch_pdl=pdl)
        try:
            print(f"PDL={pdl}: 200 Triton kernels {graph_us(chain, calls=200):.2f} us each; "
                  f"100 x (cuBLAS mm + Triton) {graph_us(mixed, calls=100):.2f} us per pair", flush=True)
        except Exception as e:          # noqa: BLE001
            print(f"PDL={pdl}: failed: {type(e).__name__}: {e}", flush=True)


def replay_trace(shape: str) -> None:
    from isokl_tl.graph_decode import StaticDecoder
    from torch.profiler import ProfilerActivity, profile

    model, tokens, steering = steered_model(shape)
    with torch.no_grad(), steering as s:
        dec = StaticDecoder(model, s, 560)
        logits = dec.prefill(tokens, torch.ones_like(tokens))
        nxt = logits.argmax(-1)
        for _ in range(100):
            dec.step(nxt)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            dec.step(nxt)
        torch.cuda.synchronize()
        print(f"replay at ~200 keys: {1000 * (time.perf_counter() - t) / 50:.3f} ms/step", flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                dec.step(nxt)
            torch.cuda.synchronize()
    path = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    ev = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("cat") == "kernel"]
    ev.sort(key=lambda e: e["ts"])
    k = len(ev) // 3
    step = ev[k:2 * k]                       # the middle replay
    span = step[-1]["ts"] + step[-1]["dur"] - step[0]["ts"]
    busy = sum(e["dur"] for e in step)
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(step, step[1:])]
    print(f"kernels per replay {k}; span {span:.0f} us, kernel time {busy:.0f} us, "
          f"gaps {sum(gaps):.0f} us (median {sorted(gaps)[len(gaps) // 2]:.2f} us)")
    by = defaultdict(lambda: [0, 0.0])
    for e in step:
        name = e["name"][:60]
        by[name][0] += 1
        by[name][1] += e["dur"]
    for name, (c, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"{d:8.1f} us  {c:4d}x  {d / c:6.2f} us  {name}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    a = ap.parse_args()
    print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())
    pdl_probe()
    replay_trace(a.shape)
