"""Figures. Each `plot_x(data, *, ax=None) -> Axes` draws into `ax` (or a new one); families of
panels (`plot_spaghetti`, `plot_aggregate`) take a figure-level `fig` instead and return its axes.
Saving is the caller's business (`save_figure`)."""

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from isokl_tl.calibrate import Calibration  # noqa: E402
from isokl_tl.rollout import Rollouts  # noqa: E402
from isokl_tl.runs import write_atomic  # noqa: E402
from isokl_tl.survival import SurvivalCurve  # noqa: E402

ALIVE, DEAD = "#3b75af", "#d1495b"
sns.set_theme(style="whitegrid", context="paper")


def _ax(ax: Axes | None, size=(5, 3.5)) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=size)[1]


def save_figure(ax_or_axes, path) -> None:
    fig = (ax_or_axes.flat[0] if isinstance(ax_or_axes, np.ndarray) else ax_or_axes).figure
    fig.tight_layout()
    write_atomic(Path(path), lambda p: fig.savefig(p, format="png", dpi=130, metadata={"Software": None}))
    plt.close(fig)


def plot_calibration(cal: Calibration, *, ax: Axes | None = None) -> Axes:
    """Statistic vs coefficient (log-log): every evaluation of the search, in order, and c*."""
    ax = _ax(ax)
    h = pd.DataFrame(cal.history).reset_index(names="order")
    h = h[(h.coeff > 0) & (h.value > 0)]
    srt = h.sort_values("coeff")
    ax.plot(srt.coeff, srt.value, color="0.6", lw=1, zorder=1)
    sc = ax.scatter(h.coeff, h.value, c=h.order, cmap="viridis", s=28, zorder=2)
    ax.axhline(cal.target, color=DEAD, ls="--", lw=1, label=f"target {cal.target:g} nat")
    ax.axvline(cal.c_star, color="k", ls=":", lw=1, label=f"c* = {cal.c_star:.4g}")
    if cal.interval:
        ax.axvspan(*cal.interval, color="k", alpha=0.08, label="90% bootstrap")
    ax.set(xscale="log", yscale="log", xlabel="coefficient c",
           ylabel=f"{cal.statistic} ({cal.quantile:g}) of per-token KL" if cal.statistic != "mean"
           else "mean per-token KL", title=f"{cal.method} @ {cal.hook}, w={cal.window}")
    ax.figure.colorbar(sc, ax=ax, label="evaluation order")
    ax.legend(fontsize=7)
    return ax


def _alpha_panels(alphas, fig=None, ncols=4, sharey=True):
    n = len(alphas)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    if fig is None:
        fig = plt.figure(figsize=(3.2 * ncols, 2.4 * nrows))
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=sharey, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return axes


def _death_times(deaths: pd.DataFrame | None) -> dict[int, float]:
    if deaths is None:
        return {}
    d = deaths[deaths.event]
    return dict(zip(d.row.astype(int), d.time.astype(float)))


def _trajectories(r: Rollouts, normalise_k: int | None, skip_first: bool) -> np.ndarray:
    kl = r.kl.numpy().astype(float).copy()
    if normalise_k:
        lo = 1 if skip_first else 0
        ref = np.nanquantile(kl[:, lo:lo + normalise_k], 0.95, axis=1)
        kl = kl / np.where(ref > 0, ref, np.nan)[:, None]
    return kl


def plot_spaghetti(r: Rollouts, *, deaths: pd.DataFrame | None = None, target: float | None = None,
                   rolling: int = 0, normalise_k: int | None = None, skip_first: bool = False,
                   fig=None) -> np.ndarray:
    """One panel per alpha: every per-token KL trajectory (alive blue, after death red), the median
    across rollouts, the target KL, EOS ticks. With `normalise_k`, each trajectory is divided by its
    own p95 over its first k raw tokens (computed before smoothing), on a shared y axis."""
    alphas = sorted(set(r.alpha.tolist()))
    axes = _alpha_panels(alphas, fig)
    kl = _trajectories(r, normalise_k, skip_first)
    died = _death_times(deaths)
    t = np.arange(r.window)
    for ax, a in zip(axes.flat, alphas):
        rows = np.nonzero(r.alpha.numpy() == a)[0]
        for i in rows:
            y = pd.Series(kl[i]).rolling(rolling, min_periods=1).mean().to_numpy() if rolling > 1 else kl[i]
            d = died.get(int(i), math.inf)
            ax.plot(t[t <= d], y[t <= d], color=ALIVE, lw=0.5, alpha=0.6)
            if d < math.inf:
                ax.plot(t[t >= d], y[t >= d], color=DEAD, lw=0.5, alpha=0.6)
            if bool(r.eos[i]):
                n = int(r.gen_len[i]) - 1
                ax.plot([n], [y[n]], marker="|", color="k", ms=6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns past every EOS
            med = np.nanmedian(kl[rows], axis=0) if len(rows) else np.full(r.window, np.nan)
        ax.plot(t, med, color="k", lw=1.2, label="median")
        if target is not None and not normalise_k:
            ax.axhline(target, color="0.3", ls="--", lw=0.8, label="target")
        ax.set_title(f"alpha = {a:g}", fontsize=9)
        ax.set_yscale("symlog", linthresh=1e-2)
    for ax in axes[-1]:
        ax.set_xlabel("generated token")
    for ax in axes[:, 0]:
        ax.set_ylabel("KL / own early p95" if normalise_k else "per-token KL (nats)")
    return axes


def plot_survival(curves: dict[float, SurvivalCurve], *, ax: Axes | None = None) -> Axes:
    """Kaplan-Meier step curves per alpha with their 95% log-log bands."""
    ax = _ax(ax)
    palette = sns.color_palette("rocket_r", len(curves))
    for color, (a, c) in zip(palette, sorted(curves.items())):
        t = np.concatenate([[0.0], c.time])
        ax.step(t, np.concatenate([[1.0], c.survival]), where="post", color=color, label=f"{a:g}")
        ax.fill_between(t, np.concatenate([[1.0], c.ci_low]), np.concatenate([[1.0], c.ci_high]),
                        step="post", color=color, alpha=0.12)
    ax.set(ylim=(-0.02, 1.02), xlabel="fork token t", ylabel="S(t): share still answering",
           title="Kaplan-Meier survival")
    ax.legend(title="alpha", fontsize=7, title_fontsize=8)
    return ax


def plot_kl_bands(r: Rollouts, *, target: float | None = None, ax: Axes | None = None,
                  legend: bool = True) -> Axes:
    """Per-alpha quantile bands of per-token KL over generated tokens (10-90%, 25-75%, median)."""
    ax = _ax(ax)
    alphas = sorted(set(r.alpha.tolist()))
    palette = dict(zip(alphas, sns.color_palette("rocket_r", len(alphas))))
    kl = r.kl.numpy().astype(float)
    t = np.arange(r.window)
    for a in alphas:
        rows = r.alpha.numpy() == a
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q = np.nanquantile(kl[rows], [0.1, 0.25, 0.5, 0.75, 0.9], axis=0)
        ax.fill_between(t, q[0], q[4], color=palette[a], alpha=0.12, lw=0)
        ax.fill_between(t, q[1], q[3], color=palette[a], alpha=0.25, lw=0)
        ax.plot(t, q[2], color=palette[a], lw=1.2, label=f"{a:g}")
    if target is not None:
        ax.axhline(target, color="0.3", ls="--", lw=0.8)
    ax.set(yscale="symlog", ylabel="per-token KL (nats)", xlabel="generated token")
    if legend:
        ax.legend(title="alpha", fontsize=7, ncol=2, title_fontsize=8)
    return ax


def plot_aggregate(r: Rollouts, pmass: pd.DataFrame, *, target: float | None = None,
                   fig=None) -> np.ndarray:
    """Top: per-alpha KL quantile bands (10-90%, 25-75%, median) over tokens. Bottom: mean pmass
    per fork and alpha."""
    if fig is None:
        fig = plt.figure(figsize=(7, 5.5))
    axes = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    plot_kl_bands(r, target=target, ax=axes[0])
    axes[0].set(xlabel="")
    alphas = sorted(set(r.alpha.tolist()))
    palette = dict(zip(alphas, sns.color_palette("rocket_r", len(alphas))))
    sns.lineplot(data=pmass, x="fork", y="pmass", hue="alpha", palette=palette, ax=axes[1],
                 legend=False, errorbar=("pi", 50), marker="o", markersize=3)
    axes[1].set(ylabel="pmass", xlabel="generated token", ylim=(0, 1))
    return axes


def plot_methods(results: dict[str, tuple[Rollouts, dict[float, SurvivalCurve], float]], *,
                 fig=None) -> np.ndarray:
    """Methods side by side at iso-KL: per-token KL bands (top) and Kaplan-Meier survival (bottom),
    one column per method. `results[name] = (rollouts, curves per alpha, c*)`."""
    if fig is None:
        fig = plt.figure(figsize=(3.2 * len(results), 6))
    axes = fig.subplots(2, len(results), sharey="row", squeeze=False)
    for j, (name, (r, curves, c_star)) in enumerate(results.items()):
        plot_kl_bands(r, target=1.0, ax=axes[0, j], legend=j == 0)
        axes[0, j].set_title(f"{name}  (c* = {c_star:.3g})")
        plot_survival(curves, ax=axes[1, j])
        axes[1, j].set_title("")
        if j:
            axes[0, j].set(ylabel="")
            axes[1, j].set(ylabel="")
            axes[1, j].get_legend().remove()
    return axes


def plot_layers(table: pd.DataFrame, propagation: pd.DataFrame | None = None, *, fig=None) -> np.ndarray:
    """Per-layer diagnostics (`isokl_tl.diagnostics.layer_study`) in six panels: c* relative to the
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
    a2.set(xlabel="layer", ylabel="gap / pooled std", title="direction quality")
    twin = a2.twinx()
    twin.plot(table.layer, table.cos_mean_diff_pca, marker="s", color="C3", label="cos(mean_diff, pca)")
    twin.set(ylabel="cos(mean_diff, pca)", ylim=(0, 1.05))
    a2.legend(loc="lower left", fontsize=7)
    twin.legend(loc="lower right", fontsize=7)
    if propagation is not None and len(propagation):
        palette = sns.color_palette("viridis", propagation.steer_layer.nunique())
        for color, (steer_at, p) in zip(palette, propagation.groupby("steer_layer")):
            p = p[p.layer >= steer_at]
            a3.plot(p.layer, p.delta / p.delta.iloc[0], color=color, marker=".", label=f"{steer_at}")
        a3.legend(title="steered at", fontsize=7, title_fontsize=7)
    a3.set(xlabel="layer", ylabel="||steered - base|| / value at steering layer", yscale="log",
           title="propagation at c*")
    a4.plot(table.layer, table.ablation_c_star, marker="o", color="C4")
    a4.set(xlabel="layer", ylabel="ablation c* (1 = remove)", title="directional ablation dose")
    a5.plot(table.layer, table.ablation_pmass_rel, marker="o", color="C5")
    a5.axhline(1.0, color="0.4", ls="--", lw=0.8)
    a5.set(xlabel="layer", ylabel="held-out pmass / unsteered", title="ablation at iso-KL", ylim=(0, None))
    return axes
