"""The figures of one run: the calibration search, per-token KL trajectories and bands, fork
pmass, Kaplan-Meier survival and the dose response."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from isokl_tl.calibrate import Calibration
from isokl_tl.plots.quantiles import nan_quantiles
from isokl_tl.plots.style import ALIVE, DEAD, _ax, _plain_log_ticks, _symlog, styled
from isokl_tl.rollout import Rollouts


@styled(fixed_titles=True)
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
    corpus = cal.statistic == "delta_ce"
    ax.set(xscale="log", yscale="log", xlabel="coefficient c",
           ylabel="mean rise in cross-entropy on the corpus, nats" if corpus else {
               "quantile": f"q={cal.quantile:g} quantile of per-token KL",
               "prompt_quantile": f"mean per-prompt q={cal.quantile:g} quantile of per-token KL",
               "mean": "mean per-token KL", "max": "max per-token KL"}[cal.statistic] + " (nats)",
           title=f"{cal.method}{' (cosine-gated)' if cal.extra.get('intervention') == 'gated' else ''} @ {cal.hook}, "
           + ("teacher-forced corpus" if corpus else f"{cal.window}-token rollouts"))
    bar = ax.figure.colorbar(sc, ax=ax, label="evaluation order (first = 0)")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    _plain_log_ticks(ax)
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
    for j in range(ncols):                 # the lowest visible panel of each column labels the x axis
        col = [ax for ax in axes[:, j] if ax.get_visible()]
        if col:
            col[-1].xaxis.set_tick_params(labelbottom=True)
            col[-1].set_xlabel("generated token")
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
        ref = nan_quantiles(kl[:, lo:lo + normalise_k].T, 0.95)[0]
        kl = kl / np.where(ref > 0, ref, np.nan)[:, None]
    return kl


@styled(fixed_titles=True)
def plot_spaghetti(r: Rollouts, *, deaths: pd.DataFrame | None = None, target: float | None = None,
                   rolling: int = 0, normalise_k: int | None = None, skip_first: bool = False,
                   death_signal: str = "pmass", fig=None) -> np.ndarray:
    """One panel per alpha: every per-token KL trajectory (alive blue, after death red, the death
    by `death_signal`, as `deaths` counts it), the median across rollouts, the target KL, EOS
    ticks. With `normalise_k`, each trajectory is divided by its
    own p95 over its first k raw tokens (computed before smoothing), on a shared y axis; a panel
    whose trajectories are all zero (alpha = 0) says so instead."""
    alphas = sorted(set(r.alpha.tolist()))
    axes = _alpha_panels(alphas, fig)
    kl = _trajectories(r, normalise_k, skip_first)
    died = _death_times(deaths)
    t = np.arange(r.window)
    for ax, a in zip(axes.flat, alphas):
        rows = np.nonzero(r.alpha.numpy() == a)[0]
        lines, colors, ends = [], [], []        # one collection of every rollout's lines, in order
        for i in rows:
            y = pd.Series(kl[i]).rolling(rolling, min_periods=1).mean().to_numpy() if rolling > 1 else kl[i]
            d = died.get(int(i), math.inf)
            lines.append(np.column_stack([t[t <= d], y[t <= d]]))
            colors.append(ALIVE)
            if d < math.inf:
                lines.append(np.column_stack([t[t >= d], y[t >= d]]))
                colors.append(DEAD)
            if bool(r.eos[i]):
                n = int(r.gen_len[i]) - 1
                ends.append((n, y[n]))
        if lines:
            ax.add_collection(LineCollection(lines, colors=colors, linewidths=0.5, alpha=0.6))
        if ends:
            ax.plot(*zip(*ends), marker="|", color="k", ms=6, ls="")
        med = nan_quantiles(kl[rows], 0.5)[0] if len(rows) else np.full(r.window, np.nan)   # NaN past every EOS
        ax.plot(t, med, color="k", lw=1.2, label="median")
        if target is not None and not normalise_k:
            ax.axhline(target, color="0.3", ls="--", lw=0.8, label="target")
        ax.set_title(f"alpha = {a:g}", fontsize=9)
        if normalise_k and np.all(np.isnan(kl[rows])):
            ax.text(0.5, 0.5, "no trajectory to normalise:\nKL is 0 at every token\n(the unsteered model)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.35")
    for ax in axes.flat:
        if ax.get_visible():
            _symlog(ax)
    for ax in axes[:, 0]:
        ax.set_ylabel("KL / own early p95" if normalise_k else "per-token KL (nats)")
    killer = "any signal" if death_signal == "any" else death_signal
    marks = [Line2D([], [], color=ALIVE, lw=1, label="rollout, alive"),
             Line2D([], [], color=DEAD, lw=1, label=f"rollout, after its death ({killer})"),
             Line2D([], [], color="k", lw=1.2, label="median over rollouts"),
             Line2D([], [], color="k", marker="|", ls="", ms=6, label="EOS (rollout ends)")]
    if target is not None and not normalise_k:
        marks.append(Line2D([], [], color="0.3", ls="--", lw=0.8, label=f"calibration target ({target:g} nat)"))
    spare = [ax for ax in axes.flat if not ax.get_visible()]
    if spare:                               # the key goes where a panel would be
        spare[-1].set_visible(True)
        spare[-1].axis("off")
        spare[-1].legend(handles=marks, loc="center", fontsize=7, frameon=False)
    else:
        axes.flat[0].legend(handles=marks, loc="upper left", fontsize=6, framealpha=0.8)
    return axes


@styled(fixed_titles=True)
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
        q = nan_quantiles(kl[rows], [0.1, 0.25, 0.5, 0.75, 0.9])
        ax.fill_between(t, q[0], q[4], color=palette[a], alpha=0.12, lw=0)
        ax.fill_between(t, q[1], q[3], color=palette[a], alpha=0.25, lw=0)
        ax.plot(t, q[2], color=palette[a], lw=1.2, label=f"{a:g}")
    if target is not None:
        ax.axhline(target, color="0.3", ls="--", lw=0.8, label=f"target {target:g} nat")
    ax.set(ylabel="per-token KL (nats)", xlabel="generated token")
    _symlog(ax)
    if legend:
        ax.legend(title="alpha (median; bands 25-75%, 10-90%)", fontsize=7, ncol=3, title_fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


@styled(fixed_titles=True)
def plot_aggregate(r: Rollouts, pmass: pd.DataFrame, *, target: float | None = None,
                   fig=None) -> np.ndarray:
    """Top: per-alpha KL quantile bands (10-90%, 25-75%, median) over tokens. Bottom: mean pmass
    per fork and alpha."""
    if fig is None:
        fig = plt.figure(figsize=(8.5, 5.5))
    axes = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    plot_kl_bands(r, target=target, ax=axes[0])
    axes[0].set(xlabel="")
    alphas = sorted(set(r.alpha.tolist()))
    palette = dict(zip(alphas, sns.color_palette("rocket_r", len(alphas))))
    for a, g in pmass.groupby("alpha"):                  # the mean at each fork, the 25-75% band
        by_fork = g.groupby("fork").pmass
        q = by_fork.quantile([0.25, 0.75]).unstack()
        mean = by_fork.mean()
        axes[1].fill_between(q.index, q[0.25], q[0.75], color=palette[a], alpha=0.2, lw=0)
        axes[1].plot(mean.index, mean.to_numpy(), color=palette[a], marker="o", markersize=3, mec="w", mew=0.5)
    axes[1].set(ylabel="pmass (mean, 25-75%)", xlabel="generated token (fork)", ylim=(0, 1))
    return axes
