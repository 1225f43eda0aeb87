"""The report of a finished run directory: every figure, and `summary.md`."""

from pathlib import Path

import numpy as np
import pandas as pd

from isokl_tl import files
from isokl_tl.calibrate import Calibration
from isokl_tl.directions import Direction
from isokl_tl.rollout import Rollouts
from isokl_tl.runs import write_atomic


def survival_curves(run_dir: Path, keep_weak: bool = False) -> dict:
    """Kaplan-Meier curves per alpha from a run's per-rollout deaths (weak prompts dropped unless
    `keep_weak`)."""
    from isokl_tl.survival import kaplan_meier

    per_row = pd.read_csv(Path(run_dir) / files.SURVIVAL)
    used = per_row if keep_weak else per_row[~per_row.weak]
    return {float(a): kaplan_meier(time=g.time.to_numpy(), event=g.event.to_numpy().astype(bool))
            for a, g in used.groupby("alpha")}


def write_figures(run_dir: Path, cfg) -> None:
    from isokl_tl.plots import (plot_aggregate, plot_calibration, plot_spaghetti, plot_survival,
                                save_figure)

    r = Rollouts.load(run_dir)
    cal = Calibration.load(run_dir)
    pm = pd.read_csv(run_dir / files.PMASS)
    per_row = pd.read_csv(run_dir / files.SURVIVAL)
    curves = survival_curves(run_dir, cfg.keep_weak)
    fig = files.FIGURES
    save_figure(plot_spaghetti(r, deaths=per_row, target=cal.target), run_dir / fig["spaghetti"])
    save_figure(plot_spaghetti(r, deaths=per_row, normalise_k=16, skip_first=True),
                run_dir / fig["normalised"])
    save_figure(plot_survival(curves), run_dir / fig["survival"])
    save_figure(plot_aggregate(r, pm, target=cal.target), run_dir / fig["aggregate"])
    save_figure(plot_calibration(cal), run_dir / fig["calibration"])


def _fmt(x: float) -> str:
    return "not reached" if not np.isfinite(x) else f"{x:g}"


def write_summary(run_dir: Path, cfg) -> None:
    cal = Calibration.load(run_dir)
    d = Direction.load(run_dir)
    table = pd.read_csv(run_dir / files.SURVIVAL_TABLE)
    per_row = pd.read_csv(run_dir / files.SURVIVAL)
    weak = sorted(set(per_row[per_row.weak].prompt.astype(int)))
    interval = f" (90% bootstrap {cal.interval[0]:.4g}-{cal.interval[1]:.4g})" if cal.interval else ""
    lines = [
        f"# isokl-tl run: {d.method} at {d.hook} on {cfg.model}", "",
        f"- c* = {cal.c_star:.4g}{interval}: {cal.statistic} q={cal.quantile:g} of per-token KL = "
        f"{cal.value:.4g} (target {cal.target:g} nat, window {cal.window}, {cal.n_tokens} tokens, "
        f"{cal.rounds} rounds, converged: {cal.converged})",
        f"- sweep: {cfg.n_prompts} `{cfg.prompts}` prompts x alphas {cfg.sweep_alphas()}, window "
        f"{cfg.window}, forks {cfg.forks()}",
        "- death: " + (f"pmass < {cfg.threshold}" if cfg.threshold is not None else
                        f"pmass < {cfg.relative_threshold} x the prompt's unsteered pmass at fork 0")
        + f", {cfg.death_run} consecutive fork(s)",
        f"- weak prompts (excluded{' - kept' if cfg.keep_weak else ''}): {weak if weak else 'none'}",
        "", "| alpha | n | died | censored | S(mid) | S(end) | median token | 95% CI |",
        "|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for t in table.itertuples():
        lines.append(f"| {t.alpha:g} | {t.n} | {t.died} | {t.censored} | {t.S_mid:.2f} | {t.S_end:.2f} "
                     f"| {_fmt(t.median)} | {_fmt(t.median_lo)} - {_fmt(t.median_hi)} |")
    lines += ["", "Figures:", ""] + [f"![{k}]({v})" for k, v in files.FIGURES.items()]
    write_atomic(run_dir / files.SUMMARY, lambda p: p.write_text("\n".join(lines) + "\n"))


def write_method_comparison(runs: dict[str, Path], png: Path, markdown: Path) -> None:
    """One figure (KL bands and survival, a column per method) and one table (c*, and per alpha
    the deaths and S at the end) for finished run directories of several methods."""
    from isokl_tl.plots import plot_methods, save_figure

    results, lines = {}, ["| method | c* | alpha | n | died | S(end) | median token |",
                          "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run_dir in runs.items():
        cal = Calibration.load(run_dir)
        results[name] = (Rollouts.load(run_dir), survival_curves(run_dir), cal.c_star)
        for t in pd.read_csv(Path(run_dir) / files.SURVIVAL_TABLE).itertuples():
            lines.append(f"| {name} | {cal.c_star:.4g} | {t.alpha:g} | {t.n} | {t.died} | "
                         f"{t.S_end:.2f} | {_fmt(t.median)} |")
    save_figure(plot_methods(results), png)
    write_atomic(Path(markdown), lambda p: p.write_text("\n".join(lines) + "\n"))
