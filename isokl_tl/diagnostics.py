"""Per-layer diagnostics: how the iso-KL dose, the KL curvature and the direction's quality vary
with depth.

For each layer L (residual stream after block L) it builds the direction, calibrates it, and reports:
- `c_star` and `c_star_rel` = c* / median residual norm at that layer (the dose in units of the
  residual stream's own scale);
- the small-c law KL ~ a c^2: `curvature_a` and `loglog_slope`, fitted on the calibration
  evaluations whose statistic is below `small` x target (NaN when fewer than two), and
  `law_holds_to` = the largest evaluated coefficient whose statistic is still within a factor 2 of
  a c^2;
- direction quality: `projection_gap` (mean positive minus mean negative projection over their
  pooled standard deviation) and `cos_mean_diff_pca`.
"""

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from isokl_tl.calibrate import Calibration, CalibrationError, CalibrationSettings, calibrate
from isokl_tl.directions import compute_direction
from isokl_tl.hooks import hook_name
from isokl_tl.prompts import ContrastPair

COLUMNS = ["layer", "hook", "method", "c_star", "converged", "c_star_rel", "resid_norm",
           "curvature_a", "loglog_slope", "law_holds_to", "projection_gap", "cos_mean_diff_pca",
           "calib_rounds", "error"]


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`0:30:3` (start:stop:step, stop exclusive) or `6,12,18`; every layer must exist."""
    try:
        if ":" in spec:
            parts = [int(p) if p else None for p in spec.split(":")]
            layers = list(range(n_layers))[slice(*parts)]
        else:
            layers = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"layers {spec!r}: give start:stop:step or a comma list like 6,12,18") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {spec!r} name {bad or 'no layer'}; this model has layers 0..{n_layers - 1}")
    return layers


@dataclass(frozen=True)
class CurvatureFit:
    a: float
    slope: float
    holds_to: float


def fit_curvature(cal: Calibration, small: float = 0.3) -> CurvatureFit:
    """Fit statistic = a c^2 on the evaluations below `small` x target (log-log least squares for
    the slope; `a` from the slope-2 law)."""
    h = pd.DataFrame(cal.history)
    h = h[(h.coeff > 0) & (h.value > 0)].sort_values("coeff")
    low = h[h.value < small * cal.target]
    if len(low) == 0:
        return CurvatureFit(math.nan, math.nan, math.nan)
    a = float(np.exp(np.mean(np.log(low.value) - 2 * np.log(low.coeff))))
    slope = float(np.polyfit(np.log(low.coeff), np.log(low.value), 1)[0]) if len(low) >= 2 else math.nan
    within = h[(h.value / (a * h.coeff ** 2)).between(0.5, 2.0)]
    return CurvatureFit(a, slope, float(within.coeff.max()) if len(within) else math.nan)


def layer_table(model: HookedTransformer, pairs: list[ContrastPair], prompts: list[list[int]],
                layers: list[int], *, method: str = "mean_diff",
                settings: CalibrationSettings = CalibrationSettings(window=32, bootstrap=0),
                rows_per_batch: int = 64, progress: bool = False) -> pd.DataFrame:
    """One row per layer (columns: `COLUMNS`). A layer whose calibration fails keeps its row, with
    the error in `error` and NaN numbers, so one bad layer does not sink the sweep."""
    rows = []
    for layer in tqdm(layers, desc="layers", disable=not progress, leave=False):
        hook = hook_name(layer)
        d = compute_direction(model, pairs, hook, method)
        md = d if method == "mean_diff" else compute_direction(model, pairs, hook, "mean_diff")
        pca = compute_direction(model, pairs, hook, "pca")
        row = {"layer": layer, "hook": hook, "method": method, "resid_norm": d.resid_norm,
               "projection_gap": d.projection_gap, "cos_mean_diff_pca": float(md.vector @ pca.vector),
               "error": ""}
        try:
            cal = calibrate(model, d, prompts, settings, rows_per_batch=rows_per_batch)
            fit = fit_curvature(cal)
            row.update(c_star=cal.c_star, converged=cal.converged, calib_rounds=cal.rounds,
                       c_star_rel=cal.c_star / d.resid_norm, curvature_a=fit.a,
                       loglog_slope=fit.slope, law_holds_to=fit.holds_to)
        except CalibrationError as e:
            row.update(error=str(e).split(";")[0])
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def plot_layers(table: pd.DataFrame, *, fig=None):
    """Three panels over depth: c* relative to the residual norm, KL curvature a, and direction
    quality (projection gap and cos(mean_diff, pca))."""
    import matplotlib.pyplot as plt

    if fig is None:
        fig = plt.figure(figsize=(10, 3.2))
    axes = fig.subplots(1, 3)
    axes[0].plot(table.layer, table.c_star_rel, marker="o")
    axes[0].set(xlabel="layer", ylabel="c* / median residual norm", title="iso-KL dose")
    axes[1].plot(table.layer, table.curvature_a, marker="o", color="C1")
    axes[1].set(xlabel="layer", ylabel="a in KL ~ a c^2", yscale="log", title="KL curvature")
    axes[2].plot(table.layer, table.projection_gap, marker="o", color="C2", label="projection gap")
    axes[2].set(xlabel="layer", ylabel="gap / pooled std", title="direction quality")
    twin = axes[2].twinx()
    twin.plot(table.layer, table.cos_mean_diff_pca, marker="s", color="C3", label="cos(mean_diff, pca)")
    twin.set(ylabel="cos(mean_diff, pca)", ylim=(0, 1.05))
    axes[2].legend(loc="lower left", fontsize=7)
    twin.legend(loc="lower right", fontsize=7)
    return axes


def table_markdown(table: pd.DataFrame) -> str:
    cols = ["layer", "c_star", "c_star_rel", "curvature_a", "loglog_slope", "law_holds_to",
            "projection_gap", "cos_mean_diff_pca", "converged", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in table[cols].itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"
