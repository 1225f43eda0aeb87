"""The root finder behind calibration: log-log bracketing, then Illinois-modified regula falsi,
written as a generator so that one driver can run many searches in lockstep (`calibrate_many`).

KL grows like a*c^2 for small c and saturates for large c, so the search works on
(log c, log statistic): a first probe gives `a`, the power law guesses where the target lies,
doubling/halving (with at least that stride) brackets it, and Illinois steps refine it. It stops
once an *evaluated* coefficient has a statistic within `tol` (relative) of the target.
"""

import math
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from isokl_tl.directions import Direction

STATISTICS = ("quantile", "mean", "max", "prompt_quantile", "delta_ce")
CORPUS_STATISTICS = ("delta_ce",)     # scored on a text corpus, teacher-forced, not on rollouts


class CalibrationError(ValueError):
    """The target cannot be bracketed; the message shows every evaluation."""


@dataclass(frozen=True)
class CalibrationSettings:
    target: float = 1.0
    quantile: float = 0.95
    statistic: str = "quantile"
    window: int = 64
    tol: float = 0.02
    max_rounds: int = 14
    generated_only: bool = False
    bootstrap: int = 200
    seed: int = 0

    def __post_init__(self):
        if not self.target > 0:
            raise ValueError(f"target KL must be > 0 nats, got {self.target}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic {self.statistic!r} is not one of {', '.join(STATISTICS)}")
        if self.window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {self.window}")
        if not 0 < self.tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.bootstrap}")


def kl_statistic(per_row: list[np.ndarray], statistic: str, quantile: float) -> float:
    """The calibration statistic over per-row arrays of valid per-token KLs (for `delta_ce`, of
    per-token rises in cross-entropy: their mean)."""
    if statistic == "prompt_quantile":
        return float(np.mean([np.quantile(r, quantile) for r in per_row if len(r)]))
    pooled = np.concatenate(per_row)
    if pooled.size == 0:
        return float("nan")
    if statistic == "quantile":
        return float(np.quantile(pooled, quantile))
    return float(pooled.mean() if statistic in ("mean", "delta_ce") else pooled.max())


@dataclass
class _Eval:
    coeff: float
    value: float
    n_tokens: int
    seconds: float
    per_row: list[np.ndarray]

    def record(self) -> dict:
        return {"coeff": self.coeff, "value": self.value, "n_tokens": self.n_tokens,
                "seconds": round(self.seconds, 3)}


def _history_text(evals: list[_Eval]) -> str:
    rows = sorted(evals, key=lambda e: e.coeff)
    return "; ".join(f"c={e.coeff:.4g}: {e.value:.4g}" for e in rows)


class Search:
    """The evaluations of one calibration so far, and what they say."""

    def __init__(self, direction: Direction, settings: CalibrationSettings):
        self.direction, self.s = direction, settings
        self.evals: list[_Eval] = []

    def record(self, coeffs: list[float], kl: np.ndarray, mask: np.ndarray, secs: float) -> None:
        """Add the evaluations of `coeffs` from their rollout rows (one block of prompts each)."""
        n = len(kl) // len(coeffs)
        for j, coeff in enumerate(coeffs):
            per_row = [kl[i][mask[i]] for i in range(j * n, (j + 1) * n)]
            value = kl_statistic(per_row, self.s.statistic, self.s.quantile)
            if not math.isfinite(value):
                raise CalibrationError(f"statistic is {value} at c={coeff:.4g}: non-finite KL "
                                       f"(NaN or inf logits?). History: {_history_text(self.evals)}")
            self.evals.append(_Eval(coeff, value, int(sum(len(x) for x in per_row)), secs, per_row))

    def bracket(self) -> tuple[_Eval | None, _Eval | None]:
        below = [e for e in self.evals if e.value < self.s.target]
        above = [e for e in self.evals if e.value >= self.s.target]
        lo = max(below, key=lambda e: e.coeff) if below else None
        hi = min(above, key=lambda e: e.coeff) if above else None
        if lo is not None and hi is not None and lo.coeff > hi.coeff:
            bad = [e for e in below if e.value < self.s.target * (1 - self.s.tol) and e.coeff > hi.coeff]
            if bad:
                raise CalibrationError(
                    f"KL statistic is non-monotone in the coefficient (above target at c={hi.coeff:.4g} "
                    f"but below at c={bad[0].coeff:.4g}); history: {_history_text(self.evals)}")
        return lo, hi

    def best(self) -> _Eval:
        return min(self.evals, key=lambda e: abs(math.log(max(e.value, 1e-30) / self.s.target)))

    def done(self) -> bool:
        return abs(self.best().value / self.s.target - 1) <= self.s.tol


def _first_coeff(direction: Direction) -> float:
    return 0.5 if direction.intervention == "ablate" else 0.1 * max(direction.resid_norm, 1e-6)


def _log_slope(a: _Eval, b: _Eval) -> float:
    if a.value <= 0 or b.value <= 0 or a.coeff == b.coeff:
        return 2.0
    s = math.log(b.value / a.value) / math.log(b.coeff / a.coeff)
    return min(max(s, 0.5), 4.0)


def steps(search: "Search") -> Generator[list[float], None, tuple[int, tuple | None]]:
    """The search as a generator: it yields the coefficients to evaluate next; the driver rolls
    them out and records them in `search`, then resumes it. Returns (rounds, jump)."""
    s = search.s
    c0 = _first_coeff(search.direction)
    c_min, c_max = c0 * 2.0 ** -24, c0 * 2.0 ** 24
    rounds, prev, last_retained, streak, jump = 0, None, None, 0, None
    candidates = [c0]
    while True:
        yield candidates
        rounds += 1
        if search.done():
            break
        lo, hi = search.bracket()
        if rounds >= s.max_rounds:
            if lo is None or hi is None:    # never a best guess from one side of the target
                raise CalibrationError(f"target {s.target} not bracketed in {s.max_rounds} rounds (max_rounds); "
                                       f"history: {_history_text(search.evals)}")
            break
        if lo is None or hi is None:
            pts = sorted(search.evals, key=lambda e: e.coeff)
            edge = pts[-1] if hi is None else pts[0]
            nxt = pts[-2] if hi is None and len(pts) > 1 else (pts[1] if len(pts) > 1 else None)
            slope = _log_slope(nxt, edge) if nxt is not None else 2.0
            if edge.value <= 0:
                guess = edge.coeff * 16
            else:
                guess = edge.coeff * (s.target / edge.value) ** (1 / slope)
            if hi is None:  # everything below target: go up, at least doubling
                # saturation is judged on a positive statistic only: `delta_ce` is negative at small
                # coefficients (and a rollout statistic may be 0 below a threshold), falling or flat there
                if (len(pts) >= 3 and pts[-3].value > 0 and pts[-1].value <= pts[-3].value * 1.05
                        and pts[-1].coeff >= 4 * pts[-3].coeff):
                    raise CalibrationError(
                        f"KL statistic saturates below the target {s.target} (it stopped growing with "
                        f"the coefficient); history: {_history_text(search.evals)}")
                guess = min(max(guess, 2 * edge.coeff), 64 * edge.coeff)
                if guess > c_max:
                    raise CalibrationError(f"target {s.target} not reached up to c={edge.coeff:.4g}; "
                                           f"history: {_history_text(search.evals)}")
                candidates = [guess, 2 * guess]
            else:  # everything above target: go down, at least halving
                guess = max(min(guess, edge.coeff / 2), edge.coeff / 64)
                if guess < c_min:
                    raise CalibrationError(
                        f"KL statistic exceeds the target {s.target} even at the smallest coefficient "
                        f"tried (c={edge.coeff:.4g}); history: {_history_text(search.evals)}")
                candidates = [guess / 2, guess]
            continue
        if hi.coeff / lo.coeff - 1 < 1e-3:
            # The statistic jumps across a bracket this narrow (a greedy token flips): no
            # coefficient reaches the target within tol. Stop; `converged` stays False.
            jump = (lo.coeff, lo.value, hi.coeff, hi.value)
            break
        # Illinois step in log-log space: when one end of the bracket survives twice in a row,
        # halve its weight so that the bracket shrinks from both sides.
        retained = "hi" if prev is not None and prev[1] == hi.coeff else "lo" if prev is not None and prev[0] == lo.coeff else None
        streak = streak + 1 if retained is not None and retained == last_retained else 1
        last_retained, prev = retained, (lo.coeff, hi.coeff)
        xl, xh = math.log(lo.coeff), math.log(hi.coeff)
        yl, yh = math.log(max(lo.value, 1e-30) / s.target), math.log(hi.value / s.target)
        if retained == "lo" and streak >= 2:
            yl *= 0.5 ** (streak - 1)
        if retained == "hi" and streak >= 2:
            yh *= 0.5 ** (streak - 1)
        x = xl - yl * (xh - xl) / (yh - yl)
        x = min(max(x, xl + 0.02 * (xh - xl)), xh - 0.02 * (xh - xl))
        candidates = [math.exp(x)]
    return rounds, jump
