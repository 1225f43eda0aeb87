"""Question: at the same KL budget, do mean_diff, pca and directional ablation keep the embedded
SmolLM2-135M-Instruct answering for as long as each other, and as long as a random direction given
the same dose ("same KL, no meaning")?

Each method gets its own run directory (the whole pipeline: direction, iso-KL calibration, alpha
sweep, fork pmass, survival) with the same prompts, window, alphas and death rule; the figure puts
their per-token KL bands and Kaplan-Meier curves side by side, and each method's dose response (S at
the window's end and the median death token per death signal, and the held-out KL, against alpha).
Regenerates figures/method_comparison.png, figures/method_dose_response.png and
figures/method_comparison.md:

    python analyses/method_comparison.py          # about 5 minutes on 2 CPU cores (5 alphas)

Run directories go to runs/methods/<method>; a rerun reuses finished stages.
"""

from pathlib import Path

from isokl_tl import Run, RunConfig
from isokl_tl.summary import write_method_comparison

METHODS = ("mean_diff", "pca", "directional_ablation", "random")
ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    runs = {}
    for method in METHODS:
        cfg = RunConfig(method=method, alphas=(0.0, 0.5, 1.0, 1.5, 2.0))
        run = Run(ROOT / "runs" / "methods" / method, cfg)
        run.run_all()
        runs[method] = run.dir
    figures = ROOT / "figures"
    write_method_comparison(runs, figures / "method_comparison.png", figures / "method_comparison.md",
                            figures / "method_dose_response.png")
    print((figures / "method_comparison.md").read_text())
