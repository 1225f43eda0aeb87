"""Survival figures of one run: Kaplan-Meier curves, the dose response (per death signal, with the
held-out KL), and the survival table under other death rules."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes

from isokl_tl.plots.style import DEAD, _ax, _plain_log_ticks, styled
from isokl_tl.survival import SurvivalCurve, SurvivalTable


@styled(fixed_titles=True)
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
                "compression": ("C2", "^", "compression"), "surprisal": ("C4", "D", "base surprisal"),
                "flip": ("C1", "v", "answer flipped"), "any": ("0.3", "x", "any signal")}


@styled(fixed_titles=True)
def plot_dose_response(table: SurvivalTable, *, by_signal: pd.DataFrame | None = None,
                       kl: pd.DataFrame | None = None, fig=None) -> np.ndarray:
    """Against alpha: S at the end of the window with its 95% band (left) and the median death
    token with its 95% interval (middle; a median not reached is drawn at the window's end, with an
    arrow), for the survival table's deaths or, with `by_signal` (`coherence.deaths_by_signal`),
    for each death signal; and (right, with `kl`: alpha, value, lo, hi) the held-out rollouts' KL
    statistic with its interval. Readable where survival curves coincide."""
    from isokl_tl.coherence import signal_curves

    panels = 2 + (kl is not None)
    if fig is None:
        fig = plt.figure(figsize=(4 * panels, 3.4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    alphas = sorted(table.curves)
    x = np.arange(len(alphas))
    top = table.window
    curves = {"pmass": table.curves} if by_signal is None else signal_curves(by_signal, keep_weak=table.keep_weak)
    shift = np.linspace(-0.15, 0.15, len(curves)) if len(curves) > 1 else [0.0]
    for dx, (signal, per_alpha) in zip(shift, curves.items()):
        color, marker, label = SIGNAL_STYLE[signal]
        end = [per_alpha[a].at(top) for a in alphas]
        band = np.array([per_alpha[a].band_at(top) for a in alphas])
        axes[0].errorbar(x + dx, end, yerr=[np.subtract(end, band[:, 0]), np.subtract(band[:, 1], end)],
                         color=color, marker=marker, capsize=2, lw=1.2, label=label)
        med = np.array([per_alpha[a].median for a in alphas])
        ci = np.array([per_alpha[a].median_ci for a in alphas])
        got = np.isfinite(med)                 # one errorbar artist per signal, one arrow set
        if got.any():
            axes[1].errorbar((x + dx)[got], med[got], yerr=[med[got] - ci[got, 0],
                                                            np.minimum(ci[got, 1], top) - med[got]],
                             color=color, marker=marker, capsize=2, ls="")
        if not got.all():                      # not reached: an arrow up at the window's end
            axes[1].vlines((x + dx)[~got], top * 0.88, top * 1.02, color=color, lw=1)
            axes[1].plot((x + dx)[~got], np.full((~got).sum(), top * 1.03), ls="", marker="^", ms=3.5,
                         color=color)
    axes[0].set(ylim=(-0.05, 1.05), ylabel=f"S(t = {top})", title="survival at the end of the window (95% band)")
    axes[0].legend(fontsize=7, loc="best", title="death by" if by_signal is not None else None, title_fontsize=7)
    axes[1].set(ylim=(-0.04 * top, 1.1 * top), ylabel="median death token",
                title="median death token (95% interval;\narrow: not reached)")
    if kl is not None:
        ax = axes[2]
        k = kl.set_index("alpha").reindex(alphas)
        ax.errorbar(x, k.value, yerr=[k.value - k.lo, k.hi - k.value], color="k", marker="o", capsize=3)
        if "target" in kl and np.isfinite(kl.target.iloc[0]):
            ax.axhline(float(kl.target.iloc[0]), color=DEAD, ls="--", lw=1, label="calibration target")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set(ylabel=str(kl.attrs.get("label", "held-out KL statistic, nats")),
               title="held-out KL (90% bootstrap over prompts)")
    for ax in axes:
        ax.set_xticks(x, [f"{a:g}" for a in alphas])
        ax.set_xlim(-0.4, len(alphas) - 0.6)
        ax.set_xlabel("alpha (x c*, evenly spaced)")
    return axes


@styled(fixed_titles=True)
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
        # thresholds where every prompt is weak (its unsteered pmass below the threshold, at fork 0 or
        # later by the rule): nothing to draw there, for both drawn death runs or for one
        kept = part[part.death_run.isin(runs)].groupby(["threshold", "death_run"]).n.max().unstack()
        empty = [t for t, n in kept.iterrows() if (n == 0).all()]
        one = {"solid": [t for t, n in kept.iterrows() if n[runs[0]] == 0 and n[runs[1]] > 0],
               "dashed": [t for t, n in kept.iterrows() if n[runs[1]] == 0 and n[runs[0]] > 0]}
        notes = [f"none drawn at {', '.join(f'{t:g}' for t in empty)}"] if empty else []
        notes += [f"no {style} point at {', '.join(f'{t:g}' for t in ts)}" for style, ts in one.items() if ts]
        if notes:
            ax.set_xlabel(f"{ax.get_xlabel()}\n({'; '.join(notes)}: every prompt weak there,\n"
                          "its unsteered pmass too low at fork 0 or dying by the rule later)", fontsize=8)
    axes[0].set_ylabel("S at the window's end")
    axes[1].plot([], [], "k-", label=f"death at {runs[0]} fork below")
    axes[1].plot([], [], "k--", label=f"death at {runs[1]} forks below in a row")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return axes
