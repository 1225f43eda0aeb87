"""Quantiles of arrays with gaps (NaN past a rollout's end), computed in one vectorised pass:
numpy's `nanquantile` loops in Python over every column, which costs a figure of a long sweep
most of its drawing time."""

import numpy as np
from jaxtyping import Float


def nan_quantiles(x: Float[np.ndarray, "n m"], qs) -> Float[np.ndarray, "q m"]:
    """The quantiles `qs` of each column of `x`, ignoring NaN, by linear interpolation between
    order statistics (numpy's default method); NaN for a column with no number. For finite
    numbers and NaN (not +-inf) equal to `np.nanquantile(x, qs, axis=0)`."""
    qs = np.atleast_1d(np.asarray(qs, dtype=float))
    if x.shape[0] == 0:
        return np.full((qs.size, x.shape[1]), np.nan)
    srt = np.sort(np.asarray(x, dtype=float), axis=0)          # NaN sort last
    n = (~np.isnan(srt)).sum(axis=0)
    pos = qs[:, None] * np.maximum(n - 1, 0)[None, :]             # fractional rank of each quantile
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0)[None, :])
    cols = np.arange(srt.shape[1])[None, :]
    a, b = srt[lo, cols], srt[hi, cols]
    frac = pos - lo
    out = a + (b - a) * frac
    out = np.where(frac == 0, a, out)                            # exact ranks: no 0 * inf
    return np.where(n[None, :] > 0, out, np.nan)
