"""Death, censoring and Kaplan-Meier survival of steered rollouts.

A rollout is alive at fork t while pmass >= threshold; it dies at the first fork where pmass falls
below it (with `death_run=k`: the first of k consecutive forks below it), and death is permanent.
A rollout that never dies is right-censored at its last evaluated fork (EOS or the window end).
The threshold is absolute, or relative to the same prompt's unsteered pmass at fork 0.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float, Real

from isokl_tl.manifest import KM_CURVES, SURVIVAL, SURVIVAL_META, SURVIVAL_TABLE, write_csv, write_json

_Z95 = NormalDist().inv_cdf(0.975)          # the two-sided 95% normal quantile
# bumped when what makes a prompt weak changes, so that a saved run's survival stage runs again
# (2: the unsteered rollout is read at every fork, not at fork 0 alone)
BASELINE_CHECK_VERSION = 2


@dataclass(frozen=True)
class DeathRule:
    threshold: float | None = None           # absolute pmass threshold
    relative_threshold: float | None = 0.5   # fraction of the prompt's own unsteered pmass at fork 0
    death_run: int = 1
    min_base_pmass: float = 0.3              # relative mode: weaker prompts are reported and excluded
    keep_weak: bool = False

    def __post_init__(self):
        if (self.threshold is None) == (self.relative_threshold is None):
            raise ValueError("give exactly one of threshold and relative-threshold")
        for name in ("threshold", "relative_threshold", "min_base_pmass"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be in (0, 1), got {v}")
        if self.death_run < 1:
            raise ValueError(f"death-run must be >= 1, got {self.death_run}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SurvivalCurve:
    """Kaplan-Meier estimate. `median` is inf when S never reaches 0.5 (likewise its bounds)."""

    time: Float[np.ndarray, " t"]
    survival: Float[np.ndarray, " t"]
    ci_low: Float[np.ndarray, " t"]
    ci_high: Float[np.ndarray, " t"]
    median: float
    median_ci: tuple[float, float]
    n: int
    died: int
    censored: int

    def at(self, t: float | int) -> float:
        """S(t) of the step function (1 before the first event time)."""
        i = np.searchsorted(self.time, t, side="right") - 1
        return 1.0 if i < 0 else float(self.survival[i])

    def band_at(self, t: float | int) -> tuple[float, float]:
        """The 95% band of S(t) ((1, 1) before the first event time)."""
        i = np.searchsorted(self.time, t, side="right") - 1
        return (1.0, 1.0) if i < 0 else (float(self.ci_low[i]), float(self.ci_high[i]))


def _first_below(curve: np.ndarray, level: float, times: np.ndarray) -> float:
    hit = np.nonzero(curve <= level)[0]
    return float(times[hit[0]]) if hit.size else math.inf


def kaplan_meier(*, time: Real[np.ndarray, " n"], event: Bool[np.ndarray, " n"]) -> SurvivalCurve:
    """The Kaplan-Meier product-limit estimate of S(t), at every distinct time (death or
    censoring), with a pointwise 95% band built on log(-log S) (Borgan and Liestol 1990) from
    Greenwood's variance. Tests hold it equal to scikit-survival's `kaplan_meier_estimator`."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    if time.shape != event.shape or time.ndim != 1 or time.size == 0:
        raise ValueError(f"time and event must be equal-length, non-empty 1-D arrays; got shapes "
                         f"{time.shape} and {event.shape}")
    if not np.isfinite(time).all() or (time < 0).any():
        raise ValueError(f"survival times must be finite and >= 0; got {time[~(np.isfinite(time) & (time >= 0))][:5]}")
    t, at_t = np.unique(time, return_inverse=True)
    died = np.bincount(at_t, weights=event, minlength=t.size)
    left = np.bincount(at_t, minlength=t.size)                  # died or censored at t
    at_risk = time.size - np.concatenate([[0], np.cumsum(left)[:-1]])
    s = np.cumprod(1.0 - died / at_risk)
    # Greenwood: Var(log S) = sum of d / (n (n - d)) over the times so far where someone outlives t
    gw = np.cumsum(np.divide(died, at_risk * (at_risk - died), out=np.zeros(t.size),
                             where=(died > 0) & (at_risk > died)))
    log_s = np.log(np.maximum(s, np.finfo(float).tiny))
    # the standard error of log(-log S) is sqrt(gw) / |log S|; S's bounds are S ** exp(-+ z se)
    se = np.divide(np.sqrt(gw), -log_s, out=np.zeros(t.size), where=log_s < 0)
    widen = np.exp(_Z95 * se)
    alive = s > np.finfo(float).eps
    lo = np.where(alive, np.exp(log_s * widen), 0.0)
    hi = np.where(alive, np.exp(log_s / widen), 0.0)
    return SurvivalCurve(time=t, survival=s, ci_low=lo, ci_high=hi,
                         median=_first_below(s, 0.5, t),
                         median_ci=(_first_below(lo, 0.5, t), _first_below(hi, 0.5, t)),
                         n=int(time.size), died=int(event.sum()), censored=int((~event).sum()))


def deaths(pmass: pd.DataFrame, rule: DeathRule) -> pd.DataFrame:
    """One row per rollout: time, event, the threshold used, its prompt's base pmass at fork 0,
    the fork where its prompt's unsteered (alpha 0) rollout dies by the same rule (NaN: it does
    not), and whether the prompt is weak (excluded unless `rule.keep_weak`).

    A prompt is weak where its unsteered pmass cannot show a steering-induced death: below the
    threshold at fork 0 (absolute rule) or below `min_base_pmass` there (relative rule), or where
    the unsteered rollout itself falls below the threshold later and dies by the rule (the
    baseline check reads every fork, not fork 0 alone)."""
    base = pmass[(pmass.alpha == 0) & (pmass.fork == 0)].groupby("prompt").pmass.first()
    if base.empty:
        raise ValueError("no unsteered (alpha 0) pmass at fork 0: include alpha 0 in the sweep")
    out = []
    for row, g in pmass.sort_values(["row", "fork"]).groupby("row", sort=True):
        prompt = int(g.prompt.iloc[0])
        b = float(base.get(prompt, np.nan))
        if rule.threshold is not None:
            thr, weak = rule.threshold, not b >= rule.threshold
        else:
            thr, weak = rule.relative_threshold * b, not b >= rule.min_base_pmass
        below = (g.pmass.to_numpy() < thr).astype(int)
        forks = g.fork.to_numpy()
        k = rule.death_run
        runs = np.convolve(below, np.ones(k, dtype=int), mode="valid") if len(below) >= k else np.array([])
        hit = np.nonzero(runs == k)[0]
        event = bool(hit.size)
        out.append({"row": int(row), "prompt": prompt, "alpha": float(g.alpha.iloc[0]),
                    "coeff": float(g.coeff.iloc[0]), "time": int(forks[hit[0]] if event else forks[-1]),
                    "event": event, "threshold": thr, "base_pmass0": b, "weak": weak})
    frame = pd.DataFrame(out, columns=["row", "prompt", "alpha", "coeff", "time", "event", "threshold",
                                       "base_pmass0", "weak"])
    unsteered = frame[(frame.alpha == 0) & frame.event]
    base_death = unsteered.groupby("prompt").time.min()
    frame.insert(frame.columns.get_loc("weak"), "base_death", frame.prompt.map(base_death).astype(float))
    frame["weak"] = frame.weak | frame.base_death.notna()
    return frame


def format_token(x: float) -> str:
    """A survival token for people: `not reached` where S never falls to 0.5 (inf)."""
    return "not reached" if not np.isfinite(x) else f"{x:g}"


def _why_empty(per_row: pd.DataFrame, rule: DeathRule | None) -> str:
    prompts = per_row.drop_duplicates("prompt")
    base = prompts.base_pmass0
    n, span = len(base), f"unsteered pmass {base.min():.2f}-{base.max():.2f} at fork 0"
    dying = int((prompts.base_death > 0).sum()) if "base_death" in prompts else 0
    later = (f"; {dying} of the {n} unsteered rollouts die by the rule later themselves (a lower threshold "
             "or a longer --death-run forgives more)") if dying else ""
    if rule is not None and rule.threshold is not None:
        return (f"all {n} prompts are weak at absolute threshold {rule.threshold:g}: {span}{later}; "
                "use --relative-threshold or --keep-weak")
    if rule is not None:
        return (f"all {n} prompts are weak: {span} (--min-base-pmass {rule.min_base_pmass:g}){later}; "
                "lower the thresholds or use --keep-weak")
    return f"all {n} prompts are weak ({span}{later}); keep them with keep_weak=True"


_TABLE_COLUMNS = ["alpha", "n", "died", "censored", "S_mid", "S_end", "median", "median_lo", "median_hi"]


@dataclass
class SurvivalTable:
    """The survival of a sweep: per rollout its death or censoring (`per_row`, from `deaths`), per
    alpha the summary (`table`: n, died, censored, S at the middle token and at the end of the
    window, the median survival token with its 95% interval, inf when not reached) and the
    Kaplan-Meier curves (`curves`)."""

    per_row: pd.DataFrame
    table: pd.DataFrame
    curves: dict[float, SurvivalCurve]
    window: int
    keep_weak: bool = False

    @property
    def weak_prompts(self) -> list[int]:
        return sorted(set(self.per_row[self.per_row.weak].prompt.astype(int)))

    def to_markdown(self) -> str:
        lines = ["| alpha | n | died | censored | S(mid) | S(end) | median token | 95% CI |",
                 "|---:|---:|---:|---:|---:|---:|---:|:---|"]
        for t in self.table.itertuples():
            lines.append(f"| {t.alpha:g} | {t.n} | {t.died} | {t.censored} | {t.S_mid:.2f} | {t.S_end:.2f} "
                         f"| {format_token(t.median)} | {format_token(t.median_lo)} - {format_token(t.median_hi)} |")
        return "\n".join(lines) + "\n"

    def save(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        write_csv(run_dir / SURVIVAL, self.per_row)
        write_csv(run_dir / SURVIVAL_TABLE, self.table)
        write_csv(run_dir / KM_CURVES, curves_frame(self.curves))
        write_json(run_dir / SURVIVAL_META, {"window": self.window, "keep_weak": self.keep_weak})

    @classmethod
    def load(cls, run_dir: str | Path) -> "SurvivalTable":
        run_dir = Path(run_dir)
        if not (run_dir / SURVIVAL_META).exists():
            raise ValueError(f"{run_dir} has no {SURVIVAL_META}; run `isokl-tl survival` first")
        meta = json.loads((run_dir / SURVIVAL_META).read_text())
        per_row = pd.read_csv(run_dir / SURVIVAL)
        return survival_table(per_row, meta["window"], keep_weak=meta["keep_weak"])


def survival_table(per_row: pd.DataFrame, window: int, *, keep_weak: bool = False,
                   rule: DeathRule | None = None) -> SurvivalTable:
    """Kaplan-Meier per alpha over the rollouts of `per_row` (weak prompts left out unless
    `keep_weak`). Raises ValueError, saying why, when no prompt is left (`rule` names the
    options that would help)."""
    use = per_row if keep_weak else per_row[~per_row.weak]
    if use.empty and len(per_row):
        raise ValueError(_why_empty(per_row, rule))
    rows, curves = [], {}
    for alpha, g in use.groupby("alpha", sort=True):
        km = kaplan_meier(time=g.time.to_numpy(), event=g.event.to_numpy())
        curves[float(alpha)] = km
        rows.append({"alpha": float(alpha), "n": km.n, "died": km.died, "censored": km.censored,
                     "S_mid": km.at(window / 2), "S_end": km.at(window), "median": km.median,
                     "median_lo": km.median_ci[0], "median_hi": km.median_ci[1]})
    return SurvivalTable(per_row=per_row, table=pd.DataFrame(rows, columns=_TABLE_COLUMNS), curves=curves,
                         window=window, keep_weak=keep_weak)


ABSOLUTE_SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
RELATIVE_SWEEP = (0.25, 0.375, 0.5, 0.625, 0.75)
DEATH_RUNS = (1, 2, 3)


def threshold_sweep(pmass: pd.DataFrame, window: int, *, min_base_pmass: float = 0.3, keep_weak: bool = False,
                    absolute: tuple[float, ...] = ABSOLUTE_SWEEP, relative: tuple[float, ...] = RELATIVE_SWEEP,
                    death_runs: tuple[int, ...] = DEATH_RUNS) -> pd.DataFrame:
    """How the survival table moves with the death rule, from pmass already measured: per rule
    (absolute and relative thresholds, each with every `death_runs`) and alpha, the rollouts kept,
    deaths, S at the window's end and the median death token. A rule under which every prompt is
    weak (an absolute threshold above every unsteered pmass, or one the unsteered rollouts fall
    below later) gets n = 0 and NaNs."""
    out = []
    for kind, values in (("absolute", absolute), ("relative", relative)):
        for value in values:
            for run in death_runs:
                rule = DeathRule(threshold=value if kind == "absolute" else None,
                                 relative_threshold=value if kind == "relative" else None, death_run=run,
                                 min_base_pmass=min_base_pmass, keep_weak=keep_weak)
                per_row = deaths(pmass, rule)
                kept = per_row if keep_weak else per_row[~per_row.weak]
                for alpha in sorted(per_row.alpha.unique()):
                    g = kept[kept.alpha == alpha]
                    row = {"rule": kind, "threshold": value, "death_run": run, "alpha": float(alpha), "n": len(g),
                           "died": int(g.event.sum()), "S_end": np.nan, "median": np.nan}
                    if len(g):
                        km = kaplan_meier(time=g.time.to_numpy(), event=g.event.to_numpy())
                        row.update(S_end=km.at(window), median=km.median)
                    out.append(row)
    return pd.DataFrame(out)


def sweep_markdown(sweep: pd.DataFrame) -> str:
    """The sweep as a table a reader scans: a row per rule, per alpha `S(end) / median token`."""
    alphas = sorted(sweep.alpha.unique())
    lines = ["| rule | death run | n | " + " | ".join(f"alpha {a:g}" for a in alphas) + " |",
             "|---|---:|---:|" + "---:|" * len(alphas)]
    for (kind, value, run), g in sweep.groupby(["rule", "threshold", "death_run"], sort=False):
        cells = []
        for a in alphas:
            r = g[g.alpha == a].iloc[0]
            cells.append("no prompt" if r.n == 0 else f"{r.S_end:.2f} / {format_token(r['median'])}")
        name = f"pmass < {value:g}" if kind == "absolute" else f"pmass < {value:g} x base"
        lines.append(f"| {name} | {run} | {int(g.n.iloc[0])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves_frame(curves: dict[float, SurvivalCurve]) -> pd.DataFrame:
    """KM step curves in long format (alpha, time, survival, ci_low, ci_high)."""
    parts = [pd.DataFrame({"alpha": a, "time": c.time, "survival": c.survival, "ci_low": c.ci_low,
                           "ci_high": c.ci_high}) for a, c in curves.items()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["alpha", "time", "survival", "ci_low", "ci_high"])
