"""A study on every visible GPU against the same study on one: wall time of `isokl-tl grid` with
the local executor (a worker per GPU) over the cells of a grid file, each from a fresh study
directory, after one model load has filled the converted-weights cache.

    python benchmarks/bench_grid.py --config benchmarks/gpu_grid.toml
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_grid(config: str, out: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "isokl_tl_cli.main", "grid", "--config", config, "--out", str(out)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="benchmarks/gpu_grid.toml")
    a = ap.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    subprocess.run([sys.executable, "-c", "from isokl_tl import load_model; load_model(device='cuda', "
                    "dtype='bfloat16')"], check=True, stderr=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        every = timed_grid(a.config, Path(tmp) / "all", dict(os.environ))
        one = timed_grid(a.config, Path(tmp) / "one", {**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
        report = (Path(tmp) / "all" / "report.md").read_text()
        same = (Path(tmp) / "all" / "report.csv").read_text() == (Path(tmp) / "one" / "report.csv").read_text()
    print(f"{a.config}: {gpus} GPUs {every:.1f} s, 1 GPU {one:.1f} s, speed-up {one / every:.2f}x; "
          f"reports identical: {same}")
    print(report)


if __name__ == "__main__":
    main()
