"""Per-layer diagnostics: how the iso-KL dose, the KL curvature, the direction's quality, the
propagation of the perturbation and the effect of directional ablation vary with depth.

For each layer L (residual stream after block L) `layer_study` builds the direction, calibrates
it, and reports (columns of `LayerStudy.table`):
- `c_star`, and `c_star_rel` = c* / median residual norm at that layer (the dose in units of the
  residual stream's own scale);
- the small-c law KL ~ a c^2: `curvature_a` and `loglog_slope`, fitted on the evaluations whose
  statistic is below `small` x target (the calibration's, plus two probes at c*/8 and c*/4), and
  `law_holds_to` = the largest evaluated coefficient whose statistic is within a factor 2 of a c^2;
- direction quality: `projection_gap` (mean positive minus mean negative projection over their
  pooled standard deviation) and `cos_mean_diff_pca`;
- propagation, from activations recorded along the calibration prompts at c*: `delta_at_layer` =
  median ||h_steered - h_base|| at L, `delta_gain_final` = the same at the last layer over the
  value at L, `delta_rel_final` = median ||h_steered - h_base|| / ||h_steered|| at the last layer
  (the whole depth profile is `LayerStudy.propagation`);
- ablation: the mean_diff direction removed by directional ablation, calibrated to the same KL
  budget (`ablation_c_star`), rolled out on held-out prompts, and its fork pmass: `ablation_pmass`
  and `ablation_pmass_rel` (over the unsteered model's pmass at the same prompts and forks).
"""

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from isokl_tl.activations import Record
from isokl_tl.calibrate import (Calibration, CalibrationError, CalibrationSettings, calibrate,
                                kl_statistic)
from isokl_tl.directions import Direction, compute_direction
from isokl_tl.hooks import hook_layer, hook_name
from isokl_tl.pmass import Splice, fork_pmass, fork_schedule
from isokl_tl.prompts import ContrastPair
from isokl_tl.rollout import rollout

COLUMNS = ["layer", "hook", "method", "c_star", "converged", "c_star_rel", "resid_norm",
           "curvature_a", "loglog_slope", "law_holds_to", "projection_gap", "cos_mean_diff_pca",
           "delta_at_layer", "delta_gain_final", "delta_rel_final", "ablation_c_star",
           "ablation_pmass", "ablation_pmass_rel", "calib_rounds", "error"]


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`0:30:3` (start:stop:step, stop exclusive) or `6,12,18`; every layer must exist."""
    try:
        if ":" in spec:
            parts = [int(p) if p else None for p in spec.split(":")]
            layers = list(range(n_layers))[slice(*parts)]
        else:
            layers = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"layers {spec!r}: give start:stop:step or a comma list like 6,12,18") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {spec!r} name {bad or 'no layer'}; this model has layers 0..{n_layers - 1}")
    return layers


@dataclass(frozen=True)
class CurvatureFit:
    a: float
    slope: float
    holds_to: float


def fit_curvature(cal: Calibration, small: float = 0.3, extra: list[dict] = ()) -> CurvatureFit:
    """Fit statistic = a c^2 on the evaluations (calibration history plus `extra`) below `small` x
    target: log-log least squares for the slope, `a` from the slope-2 law."""
    h = pd.DataFrame(list(cal.history) + list(extra))
    h = h[(h.coeff > 0) & (h.value > 0)].sort_values("coeff")
    low = h[h.value < small * cal.target]
    if len(low) == 0:
        return CurvatureFit(math.nan, math.nan, math.nan)
    a = float(np.exp(np.mean(np.log(low.value) - 2 * np.log(low.coeff))))
    slope = float(np.polyfit(np.log(low.coeff), np.log(low.value), 1)[0]) if len(low) >= 2 else math.nan
    within = h[(h.value / (a * h.coeff ** 2)).between(0.5, 2.0)]
    return CurvatureFit(a, slope, float(within.coeff.max()) if len(within) else math.nan)


@dataclass
class _Probe:
    extra: list[dict]               # small-c evaluations for the curvature fit
    profile: pd.DataFrame           # per recorded layer: median delta, norm, delta / norm at c*


def _probe(model: HookedTransformer, d: Direction, cal: Calibration, prompts: list[list[int]],
           s: CalibrationSettings, rows_per_batch: int) -> _Probe:
    """One batched rollout over the calibration prompts at c* (recording every layer's residual)
    and at c*/8 and c*/4 (the small-c end of the KL law)."""
    coeffs = [cal.c_star, cal.c_star / 8, cal.c_star / 4]
    n = len(prompts)
    r = rollout(model, [p for _ in coeffs for p in prompts], torch.tensor(coeffs).repeat_interleave(n),
                direction=d.vector, hook=d.hook, method=d.intervention, window=s.window,
                generated_only=s.generated_only, rows_per_batch=rows_per_batch, record=Record(full=()))
    kl, mask = r.kl.numpy(), r.mask.numpy()
    extra = []
    for j, c in enumerate(coeffs[1:], start=1):
        per_row = [kl[i][mask[i]] for i in range(j * n, (j + 1) * n)]
        extra.append({"coeff": c, "value": kl_statistic(per_row, s.statistic, s.quantile),
                      "n_tokens": int(sum(len(x) for x in per_row)), "probe": "curvature"})
    a, ok = r.acts, torch.as_tensor(mask[:n])
    rows = []
    for i, hook in enumerate(a.hooks):
        delta, norm = a.delta[:n, i][ok], a.norm[:n, i][ok]
        rows.append({"steer_layer": hook_layer(d.hook), "layer": hook_layer(hook),
                     "delta": float(delta.median()), "norm": float(norm.median()),
                     "delta_rel": float((delta / norm).median())})
    return _Probe(extra, pd.DataFrame(rows))


class _HeldOut:
    """Held-out prompts, their unsteered fork pmass (computed once), and the pmass of a steered
    rollout relative to it at the same prompts and forks."""

    def __init__(self, model, prompts, window, splice, rows_per_batch):
        self.model, self.prompts, self.window, self.splice = model, prompts, window, splice
        self.forks, self.rows_per_batch = fork_schedule(window, every=max(1, window // 2)), rows_per_batch
        self._base: pd.DataFrame | None = None

    def pmass(self, d: Direction, coeff: float) -> pd.DataFrame:
        r = rollout(self.model, self.prompts, torch.full((len(self.prompts),), coeff),
                    direction=d.vector, hook=d.hook, method=d.intervention, window=self.window,
                    rows_per_batch=self.rows_per_batch)
        return fork_pmass(self.model, r, d.vector, self.forks, self.splice).frame

    def relative(self, d: Direction, coeff: float) -> tuple[float, float]:
        if self._base is None:
            self._base = self.pmass(d, 0.0)
        both = self.pmass(d, coeff).merge(self._base, on=["prompt", "fork"], suffixes=("", "_base"))
        return float(both.pmass.mean()), float(both.pmass.mean() / both.pmass_base.mean())


@dataclass
class LayerStudy:
    table: pd.DataFrame                                   # one row per layer: COLUMNS
    propagation: pd.DataFrame = field(default_factory=pd.DataFrame)   # steer_layer, layer, delta, ...


def layer_study(model: HookedTransformer, pairs: list[ContrastPair], prompts: list[list[int]],
                layers: list[int], *, method: str = "mean_diff",
                settings: CalibrationSettings = CalibrationSettings(window=32, bootstrap=0),
                heldout: list[list[int]] | None = None, splice: Splice = Splice(),
                rows_per_batch: int = 64, progress: bool = False) -> LayerStudy:
    """The per-layer table (and propagation profiles). A layer whose calibration fails keeps its
    row, with the error in `error` and NaN numbers, so one bad layer does not sink the sweep.
    Without `heldout` prompts the ablation columns are NaN."""
    held = None if not heldout else _HeldOut(model, heldout, settings.window, splice, rows_per_batch)
    rows, profiles = [], []
    for layer in tqdm(layers, desc="layers", disable=not progress, leave=False):
        hook = hook_name(layer)
        d = compute_direction(model, pairs, hook, method)
        md = d if method == "mean_diff" else compute_direction(model, pairs, hook, "mean_diff")
        pca = compute_direction(model, pairs, hook, "pca")
        row = {"layer": layer, "hook": hook, "method": method, "resid_norm": d.resid_norm,
               "projection_gap": d.projection_gap, "cos_mean_diff_pca": float(md.vector @ pca.vector),
               "error": ""}
        try:
            cal = calibrate(model, d, prompts, settings, rows_per_batch=rows_per_batch)
            probe = _probe(model, d, cal, prompts, settings, rows_per_batch)
            fit = fit_curvature(cal, extra=probe.extra)
            prof = probe.profile.set_index("layer")
            row.update(c_star=cal.c_star, converged=cal.converged, calib_rounds=cal.rounds,
                       c_star_rel=cal.c_star / d.resid_norm, curvature_a=fit.a,
                       loglog_slope=fit.slope, law_holds_to=fit.holds_to,
                       delta_at_layer=prof.delta[layer],
                       delta_gain_final=prof.delta.iloc[-1] / prof.delta[layer],
                       delta_rel_final=prof.delta_rel.iloc[-1])
            profiles.append(probe.profile)
            if held is not None:
                abl = d if method == "directional_ablation" else compute_direction(
                    model, pairs, hook, "directional_ablation")
                abl_cal = cal if abl is d else calibrate(model, abl, prompts, settings,
                                                         rows_per_batch=rows_per_batch)
                pm, rel = held.relative(abl, abl_cal.c_star)
                row.update(ablation_c_star=abl_cal.c_star, ablation_pmass=pm, ablation_pmass_rel=rel)
        except CalibrationError as e:
            row.update(error=str(e).split(";")[0])
        rows.append(row)
    prop = pd.concat(profiles, ignore_index=True) if profiles else pd.DataFrame()
    return LayerStudy(pd.DataFrame(rows, columns=COLUMNS), prop)


def table_markdown(table: pd.DataFrame) -> str:
    cols = ["layer", "c_star", "c_star_rel", "curvature_a", "loglog_slope", "law_holds_to",
            "projection_gap", "cos_mean_diff_pca", "delta_gain_final", "delta_rel_final",
            "ablation_c_star", "ablation_pmass_rel", "converged", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in table[cols].itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"
