"""The figures of one run: the calibration search, per-token KL trajectories and bands, fork
pmass, Kaplan-Meier survival and the dose response."""

import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from isokl_tl.calibrate import Calibration
from isokl_tl.plots.style import ALIVE, DEAD, _ax, _plain_log_ticks, _symlog, styled
from isokl_tl.rollout import Rollouts
from isokl_tl.survival import SurvivalCurve, SurvivalTable


@styled
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
        ref = np.nanquantile(kl[:, lo:lo + normalise_k], 0.95, axis=1)
        kl = kl / np.where(ref > 0, ref, np.nan)[:, None]
    return kl


@styled
def plot_spaghetti(r: Rollouts, *, deaths: pd.DataFrame | None = None, target: float | None = None,
                   rolling: int = 0, normalise_k: int | None = None, skip_first: bool = False,
                   fig=None) -> np.ndarray:
    """One panel per alpha: every per-token KL trajectory (alive blue, after death red), the median
    across rollouts, the target KL, EOS ticks. With `normalise_k`, each trajectory is divided by its
    own p95 over its first k raw tokens (computed before smoothing), on a shared y axis; a panel
    whose trajectories are all zero (alpha = 0) says so instead."""
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
        if normalise_k and np.all(np.isnan(kl[rows])):
            ax.text(0.5, 0.5, "no trajectory to normalise:\nKL is 0 at every token\n(the unsteered model)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.35")
    for ax in axes.flat:
        if ax.get_visible():
            _symlog(ax)
    for ax in axes[:, 0]:
        ax.set_ylabel("KL / own early p95" if normalise_k else "per-token KL (nats)")
    marks = [Line2D([], [], color=ALIVE, lw=1, label="rollout, alive"),
             Line2D([], [], color=DEAD, lw=1, label="rollout, after its death (pmass)"),
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


@styled
def plot_survival(curves: dict[float, SurvivalCurve], *, ax: Axes | None = None, window: int | None = None,
                  legend: bool = True) -> Axes:
    """Kaplan-Meier step curves per alpha with their 95% log-log bands. Curves that coincide (all
    alive, all dead at the first fork) are drawn a hair apart (at most 0.03 in S) with their own
    line styles, so that each stays visible, which the x label says; the legend (`legend`) is
    outside the axes."""
    ax = _ax(ax, size=(6, 3.5))
    palette = sns.color_palette("rocket_r", len(curves))
    styles = ["-", "--", "-.", ":"]
    n = len(curves)
    for k, (color, (a, c)) in enumerate(zip(palette, sorted(curves.items()))):
        t = np.concatenate([[0.0], c.time])
        end = max(t[-1], window or 0)
        t = np.append(t, end)
        s = np.concatenate([[1.0], c.survival, c.survival[-1:]])
        nudge = 0.03 * (k - (n - 1) / 2) / max(n - 1, 1)
        ax.step(t, s + nudge, where="post", color=color, ls=styles[k % len(styles)], lw=1.6, label=f"{a:g}")
        lo = np.concatenate([[1.0], c.ci_low, c.ci_low[-1:]])
        hi = np.concatenate([[1.0], c.ci_high, c.ci_high[-1:]])
        ax.fill_between(t, lo, hi, step="post", color=color, alpha=0.10)
    note = "\n(curves that coincide are offset by at most ±0.015 to stay visible)" if n > 1 and legend else ""
    ax.set(ylim=(-0.05, 1.05), xlabel="fork token t" + note, ylabel="S(t): share still answering",
           title="Kaplan-Meier survival (95% log-log bands)")
    if legend:
        ax.legend(title="alpha", fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


SIGNAL_STYLE = {"pmass": ("C3", "o", "pmass"), "repetition": ("C0", "s", "repetition"),
                "compression": ("C2", "^", "compression"), "any": ("0.3", "x", "any signal")}


@styled
def plot_dose_response(table: SurvivalTable, *, by_signal: pd.DataFrame | None = None,
                       kl: pd.DataFrame | None = None, fig=None) -> np.ndarray:
    """Against alpha: S at the end of the window with its 95% band (left) and the median death
    token with its 95% interval (middle; a median not reached is drawn at the window's end, with an
    arrow), for the survival table's deaths or, with `by_signal` (`coherence.deaths_by_signal`),
    for each death signal; and (right, with `kl`: alpha, value, lo, hi) the held-out rollouts' KL
    statistic with its interval. Readable where survival curves coincide."""
    from isokl_tl.survival import kaplan_meier

    panels = 2 + (kl is not None)
    if fig is None:
        fig = plt.figure(figsize=(4 * panels, 3.4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    alphas = sorted(table.curves)
    x = np.arange(len(alphas))
    top = table.window
    if by_signal is None:
        curves = {"pmass": table.curves}
    else:
        use = by_signal if table.keep_weak else by_signal[~by_signal.weak.astype(bool)]
        curves = {s: {float(a): kaplan_meier(time=g.time.to_numpy(), event=g.event.to_numpy(dtype=bool))
                      for a, g in use[use.signal == s].groupby("alpha")} for s in SIGNAL_STYLE
                  if (use.signal == s).any()}
    shift = np.linspace(-0.15, 0.15, len(curves)) if len(curves) > 1 else [0.0]
    for dx, (signal, per_alpha) in zip(shift, curves.items()):
        color, marker, label = SIGNAL_STYLE[signal]
        end = [per_alpha[a].at(top) for a in alphas]
        band = np.array([per_alpha[a].band_at(top) for a in alphas])
        axes[0].errorbar(x + dx, end, yerr=[np.subtract(end, band[:, 0]), np.subtract(band[:, 1], end)],
                         color=color, marker=marker, capsize=2, lw=1.2, label=label)
        for i, a in enumerate(alphas):
            c = per_alpha[a]
            if math.isfinite(c.median):
                lo, hi = c.median_ci
                axes[1].errorbar([i + dx], [c.median], yerr=[[c.median - lo], [(hi if math.isfinite(hi) else top)
                                                                               - c.median]],
                                 color=color, marker=marker, capsize=2)
            else:
                axes[1].annotate("", xy=(i + dx, top * 1.04), xytext=(i + dx, top * 0.88),
                                 arrowprops={"arrowstyle": "->", "color": color})
    axes[0].set(ylim=(-0.05, 1.05), ylabel=f"S(t = {top})", title="survival at the end of the window (95% band)")
    axes[0].legend(fontsize=7, loc="best", title="death by" if by_signal is not None else None, title_fontsize=7)
    axes[1].set(ylim=(-0.04 * top, 1.1 * top), ylabel="median death token",
                title="median death token (95% interval;\narrow: not reached)")
    if kl is not None:
        ax = axes[2]
        k = kl.set_index("alpha").reindex(alphas)
        ax.errorbar(x, k.value, yerr=[k.value - k.lo, k.hi - k.value], color="k", marker="o", capsize=3)
        if "target" in kl:
            ax.axhline(float(kl.target.iloc[0]), color=DEAD, ls="--", lw=1, label="calibration target")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set(ylabel=str(kl.attrs.get("label", "held-out KL statistic, nats")),
               title="held-out KL (90% bootstrap over prompts)")
    for ax in axes:
        ax.set_xticks(x, [f"{a:g}" for a in alphas])
        ax.set_xlim(-0.4, len(alphas) - 0.6)
        ax.set_xlabel("alpha (dose, multiples of c*)")
    return axes


@styled
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
        ax.axhline(target, color="0.3", ls="--", lw=0.8, label=f"target {target:g} nat")
    ax.set(ylabel="per-token KL (nats)", xlabel="generated token")
    _symlog(ax)
    if legend:
        ax.legend(title="alpha (median; bands 25-75%, 10-90%)", fontsize=7, ncol=3, title_fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


@styled
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
    sns.lineplot(data=pmass, x="fork", y="pmass", hue="alpha", palette=palette, ax=axes[1],
                 legend=False, errorbar=("pi", 50), marker="o", markersize=3)
    axes[1].set(ylabel="pmass (mean, 25-75%)", xlabel="generated token (fork)", ylim=(0, 1))
    return axes


@styled
def plot_threshold_sweep(sweep: pd.DataFrame, *, fig=None) -> np.ndarray:
    """S at the window's end against the death threshold, one line per alpha: absolute thresholds
    (left) and thresholds relative to each prompt's unsteered pmass (right); solid lines for a
    death at the first fork below, dashed for the longest run of forks in the sweep."""
    if fig is None:
        fig = plt.figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2, squeeze=False, sharey=True)[0]
    alphas = sorted(sweep.alpha.unique())
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(alphas)))
    runs = (sweep.death_run.min(), sweep.death_run.max())
    for ax, kind in zip(axes, ("absolute", "relative")):
        part = sweep[sweep.rule == kind]
        for color, a in zip(colors, alphas):
            for run, style in zip(runs, ("-", "--")):
                g = part[(part.alpha == a) & (part.death_run == run)].sort_values("threshold")
                ax.plot(g.threshold, g.S_end, style, marker="o", ms=3, color=color,
                        label=f"alpha {a:g}" if run == runs[0] else None)
        ax.set(xlabel="pmass threshold" if kind == "absolute" else "threshold, x the prompt's unsteered pmass",
               title=f"{kind} thresholds", ylim=(-0.05, 1.05))
        empty = sorted(part.groupby("threshold").n.max().loc[lambda n: n == 0].index)
        if empty:      # thresholds above every prompt's unsteered pmass: nothing to draw
            ax.set_xlabel(f"{ax.get_xlabel()}\n(none drawn at {', '.join(f'{t:g}' for t in empty)}: "
                          "above every prompt's unsteered pmass)", fontsize=8)
    axes[0].set_ylabel("S at the window's end")
    axes[1].plot([], [], "k-", label=f"death at {runs[0]} fork below")
    axes[1].plot([], [], "k--", label=f"death at {runs[1]} forks below in a row")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return axes

