"""Time to result: one whole cell through the CLI, from a new process, as a user waits for it, with
the time each stage took (from the run's manifest).

    python benchmarks/time_to_result.py --cell headline        # the published H200 cell, bf16
    python benchmarks/time_to_result.py --cell main            # `make run`'s cell on the CPU

A first run fills the caches (converted weights, compiled kernels) in its own directory; the
timed runs (median of `--repeats` by wall time) each start in a fresh directory. Any further
arguments go to `isokl-tl run` (e.g. `--forks-after-sweep` for the reference pmass path).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CELLS = {
    "headline": ["--device", "cuda", "--dtype", "bfloat16", "--window", "512", "--alphas", "0,0.25,0.5,0.75,1,1.5,2,4",
                 "--n-prompts", "8", "--fork-every", "8", "--calib-window", "64", "--n-calib", "8",
                 "--bootstrap", "100"],
    "main": [],
}
STAGES = ("direction", "calibrate", "rollout", "pmass", "survival", "plot")


def run_cell(args: list[str], out: Path) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "isokl_tl_cli.main", "run", *args, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    return wall, {s: stages[s]["seconds"] for s in STAGES if s in stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=sorted(CELLS), default="headline")
    ap.add_argument("--repeats", type=int, default=1)
    a, extra = ap.parse_known_args()
    args = CELLS[a.cell] + extra
    with tempfile.TemporaryDirectory() as tmp:
        run_cell(args, Path(tmp) / "warm")                     # fills the caches
        timed = []
        for i in range(a.repeats):
            out = Path(tmp) / f"run{i}"
            timed.append((*run_cell(args, out), out))
        wall, stages, out = sorted(timed, key=lambda x: x[0])[len(timed) // 2]
        summary = (out / "summary.md").read_text()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"isokl-tl run {' '.join(args)}")
    print(f"{'whole command, wall':32s} {wall:7.1f} s")
    for s, secs in stages.items():
        print(f"{'  stage ' + s:32s} {secs:7.1f} s")
    print(f"{'  stages together':32s} {sum(stages.values()):7.1f} s")
    print(f"{'  outside the stages (import, load, ...)':32s} {wall - sum(stages.values()):7.1f} s")
    print(summary.split("\n\n")[1] if "\n\n" in summary else "")


if __name__ == "__main__":
    main()
