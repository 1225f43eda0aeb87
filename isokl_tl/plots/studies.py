"""Figures that compare: methods side by side at iso-KL, and the per-layer diagnostics."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from isokl_tl.plots.cell import plot_kl_bands
from isokl_tl.plots.style import styled
from isokl_tl.plots.survival import plot_dose_response, plot_survival
from isokl_tl.rollout import Rollouts
from isokl_tl.survival import SurvivalCurve, SurvivalTable


@styled
def plot_methods(results: dict[str, tuple[Rollouts, dict[float, SurvivalCurve], float]], *,
                 target: float | None = None, fig=None) -> np.ndarray:
    """Methods side by side at iso-KL: per-token KL bands (top) and Kaplan-Meier survival (bottom),
    one column per method. `results[name] = (rollouts, curves per alpha, c*)`; `target`: the KL
    budget they were calibrated to, drawn as a line on the KL bands (none drawn without it)."""
    if fig is None:
        fig = plt.figure(figsize=(3.2 * len(results), 6))
    axes = fig.subplots(2, len(results), sharey="row", squeeze=False)
    for j, (name, (r, curves, c_star)) in enumerate(results.items()):
        plot_kl_bands(r, target=target, ax=axes[0, j], legend=False)
        axes[0, j].set_title(f"{name}  (c* = {c_star:.3g})")
        plot_survival(curves, ax=axes[1, j], legend=False)
        axes[1, j].set_title("")
        if j:
            axes[0, j].set(ylabel="")
            axes[1, j].set(ylabel="")
    # one key for the whole figure, to the right of it (saved with bbox_inches="tight")
    bands = axes[0, 0].get_legend_handles_labels()
    steps = axes[1, 0].get_legend_handles_labels()
    fig.legend(*bands, title="per-token KL: alpha\n(median; bands 25-75%, 10-90%)", fontsize=7,
               title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.legend(*steps, title="Kaplan-Meier: alpha", fontsize=7, title_fontsize=7, loc="upper left",
               bbox_to_anchor=(1.0, 0.45))
    fig.text(0.5, -0.01, "survival curves that coincide are offset by at most ±0.015 to stay visible",
             ha="center", va="top", fontsize=7, color="0.35")
    return axes


@styled
def plot_layers(table: pd.DataFrame, propagation: pd.DataFrame | None = None, *, fig=None) -> np.ndarray:
    """Per-layer diagnostics (`isokl_tl.layers.layer_study`) in six panels: c* relative to the
    residual norm, KL curvature a, direction quality, how ||steered - base|| propagates from each
    steering layer to the last (relative to its value at the steering layer), the ablation dose, and
    held-out pmass under directional ablation at the iso-KL dose."""
    if fig is None:
        fig = plt.figure(figsize=(11, 6))
    axes = fig.subplots(2, 3)
    (a0, a1, a2), (a3, a4, a5) = axes
    a0.plot(table.layer, table.c_star_rel, marker="o")
    a0.set(xlabel="layer", ylabel="c* / median residual norm", title="iso-KL dose")
    a1.plot(table.layer, table.curvature_a, marker="o", color="C1")
    a1.set(xlabel="layer", ylabel="a in KL ~ a c^2", yscale="log", title="KL curvature")
    a2.plot(table.layer, table.projection_gap, marker="o", color="C2", label="projection gap")
    a2.set(xlabel="layer", ylabel="projection gap (pos - neg) / pooled std", title="direction quality")
    twin = a2.twinx()
    twin.plot(table.layer, table.cos_mean_diff_pca, marker="s", color="C3", label="cos(mean_diff, pca)")
    twin.set(ylabel="cos(mean_diff, pca)", ylim=(0, 1.05))
    a2.legend(handles=a2.get_lines() + twin.get_lines(), fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    if propagation is not None and len(propagation):
        palette = sns.color_palette("viridis", propagation.steer_layer.nunique())
        for color, (steer_at, p) in zip(palette, propagation.groupby("steer_layer")):
            p = p[p.layer >= steer_at]
            a3.plot(p.layer, p.delta / p.delta.iloc[0], color=color, marker=".", label=f"{steer_at}")
        a3.legend(title="steered at", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    a3.set(xlabel="layer", ylabel="||steered - base|| / value at steering layer", yscale="log",
           title="propagation at c*")
    a4.plot(table.layer, table.ablation_c_star, marker="o", color="C4")
    a4.set(xlabel="layer", ylabel="ablation c* (1 = remove)", title="directional ablation dose")
    a5.plot(table.layer, table.ablation_pmass_rel, marker="o", color="C5")
    a5.axhline(1.0, color="0.4", ls="--", lw=0.8)
    a5.set(xlabel="layer", ylabel="held-out pmass / unsteered", title="ablation at iso-KL", ylim=(0, None))
    return axes


@styled
def plot_methods_dose_response(results: dict[str, tuple[SurvivalTable, pd.DataFrame | None, pd.DataFrame | None]], *,
                               fig=None) -> np.ndarray:
    """`plot_dose_response` for each method, one row each, titled by the method:
    `results[name] = (survival table, deaths by signal or None, held-out KL per alpha or None)`.
    Returns every axes, method by method."""
    if fig is None:
        fig = plt.figure(figsize=(12, 3.6 * len(results)))
    rows = fig.subfigures(len(results), 1, squeeze=False)[:, 0]
    out = []
    for sub, (name, (table, by_signal, kl)) in zip(rows, results.items()):
        out.append(plot_dose_response(table, by_signal=by_signal, kl=kl, fig=sub))
        sub.suptitle(name, x=0.01, ha="left", fontweight="bold")
    return np.concatenate(out)


def _spread(g: pd.DataFrame) -> list:
    """c*'s error bar lengths below and above it (0 where the bootstrap interval, interpolated
    from the evaluations, does not reach past c* on that side, or is missing)."""
    lo = (g.c_star - g.c_star_lo.fillna(g.c_star)).clip(lower=0)
    hi = (g.c_star_hi.fillna(g.c_star) - g.c_star).clip(lower=0)
    return [lo, hi]


def study_axes(table: pd.DataFrame) -> list[str]:
    """The columns of a study table (`study.study_table`) that are the study's axes."""
    from isokl_tl.study import COLUMNS

    return [c for c in table.columns if c not in ("cell", *COLUMNS)]


@styled
def plot_study(table: pd.DataFrame, *, fig=None) -> np.ndarray:
    """A study's cells compared (`study.study_table`): S at the window's end against alpha, one
    line per cell (left), and c* with its 90% interval (right): against the layer, one line per
    combination of the other axes, when the study crosses layers, else one row per cell."""
    axes_cols = study_axes(table)
    cells = list(dict.fromkeys(table.cell))
    if fig is None:
        fig = plt.figure(figsize=(11, 0.9 + max(3.2, 0.28 * len(cells))))
    ax_s, ax_c = fig.subplots(1, 2, squeeze=True)
    colors = dict(zip(cells, sns.color_palette("tab10" if len(cells) <= 10 else "husl", len(cells))))
    styles = ["-", "--", "-.", ":"]
    n = len(cells)
    for k, (cell, g) in enumerate(table.groupby("cell", sort=False)):
        g = g.sort_values("alpha")
        nudge = 0.03 * (k - (n - 1) / 2) / max(n - 1, 1)      # lines that coincide stay visible
        ax_s.plot(g.alpha, g.S_end + nudge, marker="o", ms=3, color=colors[cell], ls=styles[k % len(styles)],
                  label=cell)
    ax_s.set(xlabel="alpha (dose, multiples of each cell's c*)"
             + ("\n(lines that coincide are offset by at most ±0.015 to stay visible)" if n > 1 else ""),
             ylabel="S at the window's end", title="survival at the end of the window", ylim=(-0.05, 1.05))
    per_cell = table.drop_duplicates("cell")
    if "layer" in axes_cols and per_cell.layer.nunique() > 1:
        others = [c for c in axes_cols if c != "layer"]
        for key, g in per_cell.groupby(others, sort=False) if others else [("all", per_cell)]:
            g = g.sort_values("layer")
            ax_c.errorbar(g.layer, g.c_star, yerr=_spread(g),
                          marker="o", capsize=3, label=", ".join(map(str, key if isinstance(key, tuple) else (key,))))
        ax_c.set(xlabel="layer", ylabel="c*", title="c* by layer (90% bootstrap)")
        ax_c.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_c.legend(fontsize=7, title=", ".join(others) or None, title_fontsize=7)
    else:
        y = np.arange(len(per_cell))
        ax_c.errorbar(per_cell.c_star, y, xerr=_spread(per_cell),
                      fmt="o", color="k", capsize=3)
        ax_c.set_yticks(y, per_cell.cell, fontsize=7)
        ax_c.invert_yaxis()
        ax_c.set(xlabel="c*", title="c* per cell (90% bootstrap)")
    ax_s.legend(fontsize=7, title="cell", title_fontsize=7, loc="upper left", bbox_to_anchor=(-0.02, -0.25), ncol=2)
    return np.array([ax_s, ax_c])


def _label(value) -> str:
    """An axis value as a panel or line label (a model file by its name)."""
    text = str(value)
    return text.rsplit("/", 1)[-1] if "/" in text else text


def _c_star_text(cells: pd.DataFrame) -> str:
    """c* of the cells behind one line: with its 90% interval for one cell, else the mean and
    the range over them (seeds)."""
    late = "" if cells.converged.all() else ", not converged"
    if len(cells) == 1:
        c = cells.iloc[0]
        ci = f" ({c.c_star_lo:.4g}-{c.c_star_hi:.4g}{late})" if pd.notna(c.c_star_lo) else (f" ({late[2:]})" if late else "")
        return f"c* {c.c_star:.4g}{ci}"
    return f"c* {cells.c_star.mean():.4g} ({cells.c_star.min():.4g}-{cells.c_star.max():.4g} over {len(cells)}{late})"


@styled
def plot_study_facets(table: pd.DataFrame, *, fig=None) -> np.ndarray:
    """A study's cells side by side (`study.study_table`): one panel per model (rows) and per
    method (columns), where the study crosses them, each with S at the window's end against
    alpha, one line per combination of the other axes (the same colour in every panel). Cells
    that differ only by seed make one line: their mean, with the range over the seeds shaded.
    Each line's label gives its c* (with its 90% bootstrap interval, or its range over seeds)."""
    axes_cols = study_axes(table)
    table = table.assign(**{c: table[c].map(_label) for c in axes_cols})     # labels (lists, paths: as text)
    facet_rows = "model" if "model" in axes_cols and table.model.nunique() > 1 else None
    facet_cols = "method" if "method" in axes_cols and table.method.nunique() > 1 else None
    lines = [c for c in axes_cols if c not in (facet_rows, facet_cols, "seed")]
    row_values = list(dict.fromkeys(table[facet_rows])) if facet_rows else [None]
    col_values = list(dict.fromkeys(table[facet_cols])) if facet_cols else [None]
    keys = list(dict.fromkeys(map(tuple, table[lines].values.tolist()))) if lines else [()]
    colors = dict(zip(keys, sns.color_palette("tab10" if len(keys) <= 10 else "husl", len(keys))))
    if fig is None:
        fig = plt.figure(figsize=(1.2 + 3.6 * len(col_values), 0.8 + 3.2 * len(row_values)))
    grid = fig.subplots(len(row_values), len(col_values), sharex=True, sharey=True, squeeze=False)
    for i, rv in enumerate(row_values):
        for j, cv in enumerate(col_values):
            ax, sub = grid[i, j], table
            if facet_rows:
                sub = sub[sub[facet_rows] == rv]
            if facet_cols:
                sub = sub[sub[facet_cols] == cv]
            if not len(sub):
                ax.text(0.5, 0.5, "no finished cell", ha="center", va="center", transform=ax.transAxes, color="0.4")
            groups = sub.groupby(lines, sort=False) if lines else [((), sub)]
            for k, (key, g) in enumerate(groups):
                key = key if isinstance(key, tuple) else (key,)
                per = g.groupby("alpha").S_end.agg(["mean", "min", "max"])
                nudge = 0.03 * (k - (len(keys) - 1) / 2) / max(len(keys) - 1, 1)   # coinciding lines stay visible
                name = ", ".join(f"{a} {_label(v)}" for a, v in zip(lines, key))
                label = f"{name}: {_c_star_text(g.drop_duplicates('cell'))}" if name else _c_star_text(
                    g.drop_duplicates("cell"))
                ax.plot(per.index, per["mean"] + nudge, marker="o", ms=3, color=colors[key], label=label)
                if g.cell.nunique() > 1:
                    ax.fill_between(per.index, per["min"] + nudge, per["max"] + nudge, color=colors[key], alpha=0.15,
                                    lw=0)
            title = " · ".join(_label(v) for v in (rv, cv) if v is not None)
            ax.set_title(title or "all cells", fontsize=9)
            ax.set_ylim(-0.05, 1.05)
            if len(sub):
                ax.legend(fontsize=6, loc="best", frameon=True, framealpha=0.85)
            if i == len(row_values) - 1:
                ax.set_xlabel("alpha (multiples of the cell's c*)")
            if j == 0:
                ax.set_ylabel("S at the window's end")
    seeds = "seed" in axes_cols and table.seed.nunique() > 1
    fig.suptitle("survival at the end of the window, per " + " and ".join(
        x for x in (facet_rows, facet_cols) if x) if facet_rows or facet_cols else "survival at the end of the window",
        fontsize=10)
    notes = ["lines that coincide are offset by at most ±0.015"] if len(keys) > 1 else []
    if seeds:
        notes.insert(0, "line: mean over seeds, shaded: their range")
    if notes:
        fig.text(0.5, -0.01, "; ".join(notes), ha="center", va="top", fontsize=7, color="0.35")
    return grid.ravel()
