"""Iso-KL calibration: the coefficient c* at which a KL statistic of a w-token rollout hits a target.

The search itself (log-log bracketing + Illinois steps) is `isokl_tl.search`; this module rolls out
its candidates and keeps the result (or, for the `delta_ce` statistic, scores them teacher-forced on
a text corpus: `isokl_tl.corpus`). c* always comes with a real statistic and token count (it is
an evaluated coefficient), several candidates are rolled out in one batch where that saves rounds,
and `calibrate_many` runs the searches of several directions (layers, methods) in lockstep, sharing
batches. Every evaluation is kept in `history`.
"""

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from isokl_tl.corpus import delta_ce, token_ce
from isokl_tl.directions import Direction
from isokl_tl.hooks import Site
from isokl_tl.manifest import CALIBRATION, CALIBRATION_NEGATIVE, write_json
from isokl_tl.rollout import rollout
from isokl_tl.search import (  # noqa: F401
    CORPUS_STATISTICS,
    CalibrationError,
    CalibrationSettings,
    Search,
    _Eval,
    kl_statistic,
    steps,
)


@dataclass
class Calibration:
    c_star: float
    converged: bool
    statistic: str
    quantile: float
    target: float
    window: int
    n_tokens: int
    rounds: int
    history: list[dict]
    interval: list[float] | None = None
    method: str = ""
    hook: str = ""
    tol: float = 0.02
    value: float = float("nan")
    extra: dict = field(default_factory=dict)
    sign: int = 1                  # -1: the calibration of -v

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, run_dir: str | Path, name: str = CALIBRATION) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(run_dir) / name, self.to_dict())

    @classmethod
    def load(cls, run_dir: str | Path, name: str = CALIBRATION) -> "Calibration":
        path = Path(run_dir) / name
        if not path.exists():
            raise ValueError(f"{run_dir} has no {name}; run `isokl-tl calibrate` first")
        return cls(**json.loads(path.read_text()))


def load_calibrations(run_dir: str | Path) -> dict[int, Calibration]:
    """A run's calibrations by sign: `calibration.json`'s, and -v's where the run calibrated both."""
    first = Calibration.load(run_dir)
    out = {first.sign: first}
    if (Path(run_dir) / CALIBRATION_NEGATIVE).exists():
        out[-1] = Calibration.load(run_dir, CALIBRATION_NEGATIVE)
    return out


def c_star_for(alpha: float, cals: dict[int, Calibration]) -> float:
    """The c* an alpha is a multiple of: -v's for alpha < 0 (a negative alpha adds -v, `--sign`),
    +v's for alpha > 0, either for alpha 0. Raises ValueError where that sign has no calibration of
    its own (KL at -c differs from KL at +c: one sign's c* is no iso-KL dose of the other)."""
    sign = -1 if alpha < 0 else 1
    if alpha != 0 and sign not in cals:
        raise ValueError(f"alpha {alpha:g} steers along {'-v' if sign < 0 else '+v'}, which this run did not "
                         "calibrate: calibrate that sign (--sign negative or both)")
    return (cals[sign] if sign in cals else next(iter(cals.values()))).c_star


def statistic_label(cal: "Calibration") -> str:
    """What a calibration's statistic is, in words (with its window)."""
    if cal.statistic == "delta_ce":
        return "mean rise in cross-entropy on the corpus, teacher-forced"
    what = {"quantile": f"q={cal.quantile:g} quantile", "prompt_quantile": f"mean per-prompt q={cal.quantile:g} quantile",
            "mean": "mean", "max": "max"}[cal.statistic]
    return f"{what} of per-token KL over {cal.window}-token rollouts"


def calibrate(model: HookedTransformer, direction: Direction, prompts: list[list[int]],
              settings: CalibrationSettings = CalibrationSettings(), *, rows_per_batch: int | None = None,
              progress: bool = False) -> Calibration:
    """Find c* for `direction` over the calibration `prompts` (token ids, chat-rendered; for the
    `delta_ce` statistic, corpus passages: `corpus.corpus_ids`)."""
    out = calibrate_many(model, [direction], prompts, settings, rows_per_batch=rows_per_batch,
                         progress=progress)[0]
    if isinstance(out, CalibrationError):
        raise out
    return out


def calibrate_many(model: HookedTransformer, directions: list[Direction], prompts: list[list[int]],
                   settings: CalibrationSettings = CalibrationSettings(), *, rows_per_batch: int | None = None,
                   progress: bool = False) -> list[Calibration | CalibrationError]:
    """Calibrate several directions (other layers, methods) in lockstep: every round rolls out the
    next candidates of every unfinished search in the same batches (each row steered at its own
    site only), so the searches cost about as many rounds as the slowest of them. Each search makes
    exactly the evaluations it would make alone. A search that fails gives its CalibrationError in
    its place in the list; the others go on."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    s, n = settings, len(prompts)
    searches = [Search(d, s) for d in directions]
    gens = [steps(x) for x in searches]
    pending = {i: next(g) for i, g in enumerate(gens)}
    results: list[Calibration | CalibrationError | None] = [None] * len(directions)
    sites = [Site(d.hook, d.vector, d.intervention) for d in directions]
    corpus = s.statistic == "delta_ce"
    if corpus:                         # the base model's cross-entropy of the passages, once
        base_ce = token_ce(model, prompts, torch.zeros(n), sites=sites, site=torch.zeros(n, dtype=torch.long),
                           rows_per_batch=rows_per_batch)
    bar = tqdm(total=s.max_rounds, desc="calibrate", unit="round", disable=not progress, leave=False)
    try:
        while pending:
            order = list(pending)
            coeff = [c for i in order for c in pending[i] for _ in range(n)]
            site = [i for i in order for _ in pending[i] for _ in range(n)]
            t0 = time.perf_counter()
            if corpus:
                ce = token_ce(model, prompts * (len(coeff) // n), torch.tensor(coeff), sites=sites,
                              site=torch.tensor(site), rows_per_batch=rows_per_batch)
                kl, mask = delta_ce(ce, base_ce.repeat(len(coeff) // n, 1))
            else:
                r = rollout(model, prompts * (len(coeff) // n), torch.tensor(coeff), sites=sites,
                            site=torch.tensor(site), window=s.window, generated_only=s.generated_only,
                            rows_per_batch=rows_per_batch)
                kl, mask = r.kl.numpy(), r.mask.numpy()
            secs = (time.perf_counter() - t0) / (len(coeff) // n)
            row = 0
            advanced = {}
            for i in order:
                k = len(pending[i]) * n
                try:
                    searches[i].record(pending[i], kl[row:row + k], mask[row:row + k], secs)
                    advanced[i] = gens[i].send(None)
                except StopIteration as stop:
                    results[i] = _result(searches[i], *stop.value, n)
                except CalibrationError as e:
                    results[i] = e
                row += k
            pending = advanced
            bar.update(1)
            if len(directions) == 1 and searches[0].evals:
                best = searches[0].best()
                bar.set_postfix_str(f"c={best.coeff:.4g} stat={best.value:.4g}")
            else:
                bar.set_postfix_str(f"{len(pending)} searches left")
    finally:
        bar.close()
    return results


def _result(search: Search, rounds: int, jump: tuple | None, n_prompts: int) -> Calibration:
    s, d = search.s, search.direction
    best = search.best()
    cal = Calibration(
        c_star=best.coeff, converged=search.done(), statistic=s.statistic, quantile=s.quantile,
        target=s.target, window=s.window, n_tokens=best.n_tokens, rounds=rounds,
        history=[e.record() for e in search.evals], method=d.method, hook=d.hook,
        tol=s.tol, value=best.value, sign=int(d.extra.get("sign", 1)),
        extra={**({"jump": dict(zip(("c_lo", "value_lo", "c_hi", "value_hi"), jump))} if jump else {}),
               **({"intervention": "gated"} if d.intervention == "gated" else {})},
    )
    if s.bootstrap:
        cal.interval = bootstrap_interval(search.evals, s, n_prompts)
    return cal


def bootstrap_interval(evals: list[_Eval], s: CalibrationSettings, n_prompts: int,
                       level: float = 0.90) -> list[float] | None:
    """Resample calibration prompts, recompute the statistic at every evaluated coefficient from
    the per-token KLs already in hand, and interpolate c* in log-log space; percentile interval.

    A resample whose statistic stays below the target at every evaluated coefficient has its c*
    above them all, one above it everywhere below them all: both count, at the edge they lie
    beyond, so the interval is not conditioned on bracketing. None where an end of the interval
    lies beyond the evaluated coefficients, or with fewer than max(10, bootstrap / 4) resamples whose
    statistics are finite."""
    rng = np.random.default_rng(s.seed)
    pts = sorted(evals, key=lambda e: e.coeff)
    logc = np.log([e.coeff for e in pts])
    beyond = np.finfo(float).max / 4          # a finite stand-in for "above every coefficient"
    stars = []
    for _ in range(s.bootstrap):
        idx = rng.integers(0, n_prompts, n_prompts)
        vals = np.array([kl_statistic([e.per_row[i] for i in idx], s.statistic, s.quantile) for e in pts])
        if not np.isfinite(vals).all():        # no tokens behind a statistic in this resample
            continue
        vals = np.maximum.accumulate(np.maximum(vals, 1e-30))  # monotone envelope for interpolation
        logv = np.log(vals)
        if logv[-1] < math.log(s.target):
            stars.append(beyond)
        elif logv[0] > math.log(s.target):
            stars.append(0.0)
        else:
            stars.append(math.exp(np.interp(math.log(s.target), logv, logc)))
    if len(stars) < max(10, s.bootstrap // 4):
        return None
    tail = (1 - level) / 2
    lo, hi = float(np.quantile(stars, tail)), float(np.quantile(stars, 1 - tail))
    if not (pts[0].coeff <= lo and hi <= pts[-1].coeff):
        return None
    return [lo, hi]
