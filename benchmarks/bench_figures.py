"""The figures stage of one finished run: each figure drawn and saved alone in this process (the
fastest of `--repeats`), then the whole stage as a run does it (`Run.plot`, figures side by side
in forked workers while the summary is written; median of `--repeats`).

    python benchmarks/bench_figures.py --run-dir RUN     # a finished run directory
    python benchmarks/bench_figures.py                   # makes a headline-shaped run of the tiny model first

Without `--run-dir` it runs the headline cell's shape (8 prompts x 8 alphas, forks every 8 tokens)
on the tiny random model, on the CPU, with a window of 320 (the tiny model's context is 512).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADLINE_SHAPE = ["--model", "tiny-random", "--window", "320", "--alphas", "0,0.25,0.5,0.75,1,1.5,2,4",
                  "--n-prompts", "8", "--fork-every", "8", "--calib-window", "64", "--n-calib", "8",
                  "--bootstrap", "100", "--prompts", "eval", "--keep-weak"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = a.run_dir
        if run_dir is None:
            run_dir = Path(tmp) / "run"
            subprocess.run([sys.executable, "-m", "isokl_tl_cli.main", "run", *HEADLINE_SHAPE, "--out", str(run_dir)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        measure(run_dir, a.repeats, Path(tmp) / "figures")


def measure(run_dir: Path, repeats: int, out: Path, repeats_stage: int = 5) -> None:
    import matplotlib
    matplotlib.use("Agg")

    import isokl_tl.plots.style as style
    import isokl_tl.summary as summary
    from isokl_tl.config import RunConfig
    from isokl_tl.run import Run

    cfg = RunConfig.from_dict(json.loads((run_dir / "manifest.json").read_text())["config"])
    jobs = []
    real = style.save_figures
    style.save_figures = lambda j, meanwhile=None: jobs.extend(j)        # collect the figures' jobs
    summary.write_figures(run_dir, cfg)
    style.save_figures = real
    out.mkdir(parents=True, exist_ok=True)
    print(f"run {run_dir}: {len(jobs)} figures; seconds, fastest of {repeats}")
    print(f"{'figure':30s} {'draw':>6s} {'save':>6s} {'both':>6s}")
    for draw, path in jobs:
        best = (float("inf"), 0.0, 0.0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            ax = draw()
            t1 = time.perf_counter()
            style.save_figure(ax, out / path.name)
            t2 = time.perf_counter()
            best = min(best, (t2 - t0, t1 - t0, t2 - t1))
        print(f"{path.name:30s} {best[1]:6.3f} {best[2]:6.3f} {best[0]:6.3f}")
    if not repeats_stage:
        return
    run = Run(run_dir, cfg, log=lambda *_: None, progress=False)
    stage = []
    for _ in range(repeats):
        run.plot(force=True)
        stage.append(run.manifest.data["stages"]["plot"]["seconds"])
    print(f"the plot stage (Run.plot: figures in forked workers, summary meanwhile): median "
          f"{statistics.median(stage):.3f} s, runs {', '.join(f'{s:.2f}' for s in stage)}")


if __name__ == "__main__":
    main()
