"""How a calibration carries over to the held-out rollouts: its own statistic recomputed on the
sweep's rollouts, over the calibration window and the whole window, with bootstrap intervals over
prompts (`transfer`, one line of the summary: `transfer_line`), and per alpha for the
dose-response figure (`heldout_kl`)."""

import numpy as np
import pandas as pd

from isokl_tl.calibrate import Calibration
from isokl_tl.rollout import Rollouts
from isokl_tl.search import CORPUS_STATISTICS, kl_statistic


def transfer(rollouts: Rollouts, cal: Calibration, *, alpha: float = 1.0, bootstrap: int = 1000, seed: int = 0,
             level: float = 0.90) -> dict:
    """How the calibration carries over to the held-out rollouts: its own statistic (same kind,
    quantile and target) recomputed on the rollouts at `alpha` (the calibrated dose when 1), over
    their first `cal.window` tokens and over their whole window, each with a percentile bootstrap
    interval over held-out prompts, and the statistic of each prompt alone (min, median, max).
    A corpus statistic (`delta_ce`) scores no rollouts: it has no transfer to give."""
    if cal.statistic in CORPUS_STATISTICS:
        raise ValueError(f"the {cal.statistic} statistic scores a text corpus, not rollouts: no transfer to held-out rollouts")
    rows = (rollouts.alpha == alpha).nonzero().flatten().tolist()
    if not rows:
        raise ValueError(f"the rollouts have no rows at alpha {alpha}")
    rng = np.random.default_rng(seed)
    out = {"alpha": alpha, "statistic": cal.statistic, "quantile": cal.quantile, "target": cal.target,
           "n_prompts": len(rows), "level": level}
    for name, width in (("calibration_window", cal.window), ("whole_window", rollouts.window)):
        per_row = _valid_kl(rollouts, rows, width)
        value, interval = _with_interval(per_row, cal, rng, bootstrap, level)
        alone = [kl_statistic([r], cal.statistic, cal.quantile) for r in per_row if len(r)]
        out[name] = {"tokens": min(width, rollouts.window), "n_tokens": int(sum(len(r) for r in per_row)),
                     "value": value, "interval": interval,
                     "per_prompt": [float(np.min(alone)), float(np.median(alone)), float(np.max(alone))]}
    return out


def _valid_kl(rollouts: Rollouts, rows: list[int], width: int) -> list[np.ndarray]:
    """Per row: the per-token KLs of its generated tokens among the first `width`."""
    kl, mask = rollouts.kl.numpy(), rollouts.mask.numpy()
    return [kl[i, :width][mask[i, :width]] for i in rows]


def _with_interval(per_row: list[np.ndarray], cal: Calibration, rng: np.random.Generator, bootstrap: int,
                   level: float) -> tuple[float, list[float] | None]:
    """The calibration's statistic over `per_row`, and its percentile bootstrap interval over the
    rows (None with no draws)."""
    n = len(per_row)
    draws = [kl_statistic([per_row[j] for j in rng.integers(0, n, n)], cal.statistic, cal.quantile)
             for _ in range(bootstrap)]
    tail = (1 - level) / 2
    interval = [float(np.nanquantile(draws, tail)), float(np.nanquantile(draws, 1 - tail))] if draws else None
    return kl_statistic(per_row, cal.statistic, cal.quantile), interval


def heldout_kl(rollouts: Rollouts, cal: Calibration, *, bootstrap: int = 200, seed: int = 0,
               level: float = 0.90) -> pd.DataFrame:
    """Per alpha: the calibration's statistic over the held-out rollouts' whole window, with a
    percentile bootstrap interval over prompts (the dose-response figure's KL panel). For a corpus
    statistic, the q-quantile of per-token KL instead (no target line then)."""
    rng = np.random.default_rng(seed)
    if cal.statistic in CORPUS_STATISTICS:
        cal = Calibration(**{**cal.to_dict(), "statistic": "quantile", "target": float("nan")})
    rows = []
    for alpha in sorted(set(rollouts.alpha.tolist())):
        if alpha == 0:                 # the unsteered model's KL is 0 everywhere
            continue
        per_row = _valid_kl(rollouts, (rollouts.alpha == alpha).nonzero().flatten().tolist(), rollouts.window)
        value, interval = _with_interval(per_row, cal, rng, bootstrap, level)
        lo, hi = interval or (value, value)
        rows.append({"alpha": alpha, "value": value, "lo": float(lo), "hi": float(hi), "target": cal.target})
    out = pd.DataFrame(rows, columns=["alpha", "value", "lo", "hi", "target"])
    out.attrs["label"] = (f"q={cal.quantile:g} quantile of per-token KL, nats" if cal.statistic == "quantile"
                          else f"{cal.statistic} of per-token KL, nats")
    return out


def transfer_line(t: dict) -> str:
    """`transfer`'s result as one line of a summary."""
    stat = f"q={t['quantile']:g} quantile" if t["statistic"] == "quantile" else t["statistic"]
    parts = [f"{d['value']:.3g} over {span}" + (f" ({t['level']:.0%} bootstrap over prompts "
                                               f"{d['interval'][0]:.3g}-{d['interval'][1]:.3g})" if d["interval"] else "")
             for d, span in ((t["calibration_window"], f"the first {t['calibration_window']['tokens']} tokens"),
                             (t["whole_window"], f"the whole {t['whole_window']['tokens']}-token window"))]
    lo, med, hi = t["whole_window"]["per_prompt"]
    return (f"calibration transfer: at alpha {t['alpha']:g} the {t['n_prompts']} held-out rollouts' {stat} of "
            f"per-token KL is {parts[0]} and {parts[1]}, against the {t['target']:g}-nat target; per prompt "
            f"{lo:.3g}-{hi:.3g} (median {med:.3g})")
