"""A study on every visible GPU against the same study on one: wall time of `isokl-tl grid` over
the cells of a grid file, each from a fresh study directory, after one model load has filled the
converted-weights cache; with each executor asked for (`--executors local,ray`), and whether
their reports agree.

    python benchmarks/bench_grid.py --config benchmarks/gpu_grid.toml            # 8 cells, the embedded model
    python benchmarks/bench_grid.py --config benchmarks/gpu_grid_tiny.toml --executors local,ray
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path


def timed_grid(config: str, out: Path, env: dict, executor: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "isokl_tl_cli.main", "grid", "--config", config, "--out", str(out),
                    "--executor", executor], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="benchmarks/gpu_grid.toml")
    ap.add_argument("--executors", default="local", help="comma-separated: local, ray")
    a = ap.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    model = tomllib.loads(Path(a.config).read_text()).get("shared", {}).get("model", "smollm2-135m-instruct")
    subprocess.run([sys.executable, "-c", f"from isokl_tl import load_model; load_model({model!r}, device='cuda', "
                    "dtype='bfloat16')"], check=True, stderr=subprocess.DEVNULL)
    lines, reports = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for ex in a.executors.split(","):
            secs = timed_grid(a.config, Path(tmp) / ex, dict(os.environ), ex)
            reports[f"{gpus} GPU(s), {ex}"] = (Path(tmp) / ex / "report.csv").read_text()
            lines.append((f"{gpus} GPU(s), {ex} executor", secs))
        if gpus > 1:
            secs = timed_grid(a.config, Path(tmp) / "one", {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}, "local")
            reports["1 GPU, local"] = (Path(tmp) / "one" / "report.csv").read_text()
            lines.append(("1 GPU, local executor", secs))
        first = next(iter(reports))
        print((Path(tmp) / a.executors.split(",")[0] / "report.md").read_text())
    print(f"{a.config}:")
    for name, secs in lines:
        print(f"  {name:28s} {secs:7.1f} s   (1-GPU local / this: {lines[-1][1] / secs:.2f}x)")
    print(f"  reports identical to {first!r}: " + ", ".join(f"{k} {v == reports[first]}" for k, v in reports.items()))


if __name__ == "__main__":
    main()
