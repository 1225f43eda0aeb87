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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from isokl_tl.activations import Record
from isokl_tl.calibrate import Calibration, CalibrationError, CalibrationSettings, calibrate_many
from isokl_tl.directions import Direction, check_method, compute_direction
from isokl_tl.hooks import Site, hook_layer, hook_name
from isokl_tl.manifest import (
    LAYERS_FIGURE,
    LAYERS_MARKDOWN,
    LAYERS_PROPAGATION,
    LAYERS_TABLE,
    check_writable,
    write_atomic,
    write_csv,
)
from isokl_tl.pmass import fork_pmass, fork_schedule
from isokl_tl.splice import Splice
from isokl_tl.prompts import ContrastPair
from isokl_tl.rollout import rollout
from isokl_tl.search import Search

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


def _probe(model: HookedTransformer, found: dict[int, tuple[Direction, Calibration]],
           prompts: list[list[int]], s: CalibrationSettings, rows_per_batch: int | None
           ) -> tuple[dict[int, list[dict]], pd.DataFrame]:
    """One batched rollout over the calibration prompts, for every calibrated layer at c* (recording
    every layer's residual) and at c*/8 and c*/4 (the small-c end of the KL law). Returns the
    small-c evaluations per layer and the propagation profiles."""
    layers = list(found)
    sites = [Site(d.hook, d.vector, d.intervention) for d, _ in found.values()]
    n, fractions = len(prompts), (1.0, 1 / 8, 1 / 4)
    coeff = [found[layer][1].c_star * f for layer in layers for f in fractions for _ in range(n)]
    site = [j for j in range(len(layers)) for _ in fractions for _ in range(n)]
    r = rollout(model, prompts * (len(coeff) // n), torch.tensor(coeff), sites=sites,
                site=torch.tensor(site), window=s.window, generated_only=s.generated_only,
                rows_per_batch=rows_per_batch, record=Record(full=()))
    kl, mask, a = r.kl.numpy(), r.mask.numpy(), r.acts
    extra, profiles = {}, []
    for j, layer in enumerate(layers):
        base = j * len(fractions) * n
        probes = Search(found[layer][0], s)           # the same statistic as calibration's
        rows = slice(base + n, base + len(fractions) * n)
        probes.record([found[layer][1].c_star * f for f in fractions[1:]], kl[rows], mask[rows], 0.0)
        extra[layer] = [e.record() for e in probes.evals]
        ok = torch.as_tensor(mask[base:base + n])
        for i, hook in enumerate(a.hooks):
            delta, norm = a.delta[base:base + n, i][ok], a.norm[base:base + n, i][ok]
            profiles.append({"steer_layer": layer, "layer": hook_layer(hook), "delta": float(delta.median()),
                             "norm": float(norm.median()), "delta_rel": float((delta / norm).median())})
    return extra, pd.DataFrame(profiles)


def _heldout_pmass(model: HookedTransformer, ablations: dict[int, tuple[Direction, float]],
                   prompts: list[list[int]], window: int, splice: Splice, rows_per_batch: int | None
                   ) -> dict[int, tuple[float, float]]:
    """Held-out rollouts of the unsteered model and of every layer's ablation at its c*, in one
    batch; then fork pmass at the start, middle and end of the window. Per layer: (mean pmass,
    mean pmass / the unsteered model's at the same prompts and forks)."""
    layers, n = list(ablations), len(prompts)
    sites = [Site(d.hook, d.vector, d.intervention) for d, _ in ablations.values()]
    coeff = [0.0] * n + [ablations[layer][1] for layer in layers for _ in range(n)]
    site = [0] * n + [j for j in range(len(layers)) for _ in range(n)]
    r = rollout(model, prompts * (len(layers) + 1), torch.tensor(coeff), sites=sites,
                site=torch.tensor(site), window=window, rows_per_batch=rows_per_batch,
                prompt_index=torch.arange(n).repeat(len(layers) + 1))
    forks = fork_schedule(window, every=max(1, window // 2))

    def pmass(j: int, d: Direction) -> pd.DataFrame:
        part = r.take(list(range(j * n, (j + 1) * n)), hook=d.hook, method=d.intervention)
        return fork_pmass(model, part, d.vector, forks, splice).frame

    base = pmass(0, ablations[layers[0]][0])
    out = {}
    for j, layer in enumerate(layers, start=1):
        both = pmass(j, ablations[layer][0]).merge(base, on=["prompt", "fork"], suffixes=("", "_base"))
        out[layer] = (float(both.pmass.mean()), float(both.pmass.mean() / both.pmass_base.mean()))
    return out


def default_layers(n_layers: int, count: int = 6) -> list[int]:
    """`count` layers spread evenly from the first to the last."""
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)})


@dataclass
class LayerStudy:
    """The per-layer table (one row per layer: `COLUMNS`) and the propagation profiles (one row
    per steering layer and later layer: steer_layer, layer, delta, norm, delta_rel)."""

    table: pd.DataFrame
    propagation: pd.DataFrame = field(default_factory=pd.DataFrame)

    def to_markdown(self) -> str:
        return table_markdown(self.table)

    def save(self, out_dir: str | Path, *, figure: bool = True) -> None:
        """`layers.csv`, `layers_propagation.csv`, `layers.md` and (with `figure`) `layers.png`."""
        out = check_writable(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / LAYERS_TABLE, self.table)
        write_csv(out / LAYERS_PROPAGATION, self.propagation)
        write_atomic(out / LAYERS_MARKDOWN, lambda p: p.write_text(self.to_markdown()))
        if figure:
            from isokl_tl.plots import plot_layers, save_figure
            save_figure(plot_layers(self.table, self.propagation), out / LAYERS_FIGURE)

    @classmethod
    def load(cls, out_dir: str | Path) -> "LayerStudy":
        out = Path(out_dir)
        if not (out / LAYERS_TABLE).exists():
            raise ValueError(f"{out} has no {LAYERS_TABLE}; run `isokl-tl layers` first")
        table = pd.read_csv(out / LAYERS_TABLE, keep_default_na=False, na_values=[""])
        table["error"] = table["error"].fillna("").astype(str)
        prop = out / LAYERS_PROPAGATION
        return cls(table, pd.read_csv(prop) if prop.stat().st_size > 1 else pd.DataFrame())


def layer_study(model: HookedTransformer, pairs: list[ContrastPair], prompts: list[list[int]],
                layers: list[int], *, method: str = "mean_diff",
                settings: CalibrationSettings = CalibrationSettings(window=32, bootstrap=0),
                heldout: list[list[int]] | None = None, splice: Splice = Splice(),
                rows_per_batch: int | None = None, progress: bool = False) -> LayerStudy:
    """The per-layer table (and propagation profiles). Layers run batched: every layer's (and every
    ablation's) calibration runs in lockstep in shared batches, then one rollout probes them all,
    then one rollout gives the held-out ablation runs. A layer whose calibration fails keeps its
    row, with the error in `error` and NaN numbers. Without `heldout` prompts the ablation columns
    are NaN."""
    rows, dirs, abls = {}, {}, {}
    for layer in tqdm(layers, desc="directions", disable=not progress, leave=False):
        hook = hook_name(layer)
        d = compute_direction(model, pairs, hook, method)
        md = d if method == "mean_diff" else compute_direction(model, pairs, hook, "mean_diff")
        pca = compute_direction(model, pairs, hook, "pca")
        dirs[layer] = d
        if heldout:
            abls[layer] = d if method == "directional_ablation" else compute_direction(
                model, pairs, hook, "directional_ablation")
        rows[layer] = {"layer": layer, "hook": hook, "method": method, "resid_norm": d.resid_norm,
                       "projection_gap": d.projection_gap,
                       "cos_mean_diff_pca": float(md.vector @ pca.vector), "error": ""}
    todo = [dirs[layer] for layer in layers]
    todo += [abls[layer] for layer in abls if abls[layer] is not dirs[layer]]
    cals = dict(zip(map(id, todo), calibrate_many(model, todo, prompts, settings,
                                                  rows_per_batch=rows_per_batch, progress=progress)))
    found = {}
    for layer in layers:
        cal = cals[id(dirs[layer])]
        if isinstance(cal, CalibrationError):
            rows[layer]["error"] = str(cal).split(";")[0]
            continue
        found[layer] = (dirs[layer], cal)
        rows[layer].update(c_star=cal.c_star, converged=cal.converged, calib_rounds=cal.rounds,
                           c_star_rel=cal.c_star / dirs[layer].resid_norm)
    profiles = pd.DataFrame()
    if found:
        extra, profiles = _probe(model, found, prompts, settings, rows_per_batch)
        for layer, (d, cal) in found.items():
            fit = fit_curvature(cal, extra=extra[layer])
            prof = profiles[profiles.steer_layer == layer].set_index("layer")
            rows[layer].update(curvature_a=fit.a, loglog_slope=fit.slope, law_holds_to=fit.holds_to,
                               delta_at_layer=prof.delta[layer],
                               delta_gain_final=prof.delta.iloc[-1] / prof.delta[layer],
                               delta_rel_final=prof.delta_rel.iloc[-1])
    ablated = {layer: (abls[layer], cals[id(abls[layer])].c_star) for layer in found
               if heldout and not isinstance(cals[id(abls[layer])], CalibrationError)}
    if ablated:
        for layer, (pm, rel) in _heldout_pmass(model, ablated, heldout, settings.window, splice,
                                               rows_per_batch).items():
            rows[layer].update(ablation_c_star=ablated[layer][1], ablation_pmass=pm, ablation_pmass_rel=rel)
    return LayerStudy(pd.DataFrame([rows[layer] for layer in layers], columns=COLUMNS), profiles)


def table_markdown(table: pd.DataFrame) -> str:
    cols = ["layer", "c_star", "c_star_rel", "curvature_a", "loglog_slope", "law_holds_to",
            "projection_gap", "cos_mean_diff_pca", "delta_gain_final", "delta_rel_final",
            "ablation_c_star", "ablation_pmass_rel", "converged", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in table[cols].itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def study_layers(model: str | None, out_dir: str | Path, *, device: str = "cpu", dtype: str = "float32",
                 layer_spec: str | None = None, method: str = "mean_diff", pairs: str = "pairs",
                 calib_prompts: str = "calibration", n_calib: int = 8, calib_window: int = 32,
                 target_kl: float = 1.0, heldout_prompts: str = "eval", n_heldout: int = 8,
                 progress: bool = True) -> LayerStudy:
    """`isokl-tl layers`: check every input, load the model (`model` None: the embedded one), run
    `layer_study` at the chosen layers (default: 6 spread evenly) and save it into `out_dir`."""
    from isokl_tl.models import EMBEDDED, check_spec, load_model
    from isokl_tl.prompts import load_pairs, load_prompts
    from isokl_tl.tokens import prompt_ids

    spec = model or EMBEDDED
    check_writable(out_dir)
    check_spec(spec)
    check_method(method)
    pair_set = load_pairs(pairs)
    calib = load_prompts(calib_prompts)[:n_calib]
    heldout = load_prompts(heldout_prompts)[:n_heldout] if n_heldout else []
    settings = CalibrationSettings(window=calib_window, target=target_kl, bootstrap=0)
    lm = load_model(spec, device=device, dtype=dtype)
    n = lm.cfg.n_layers
    chosen = parse_layers(layer_spec, n) if layer_spec else default_layers(n)
    ids = [prompt_ids(lm.tokenizer, p) for p in calib]
    held = [prompt_ids(lm.tokenizer, p) for p in heldout] or None
    study = layer_study(lm, pair_set, ids, chosen, method=method, settings=settings, heldout=held,
                        progress=progress)
    study.save(out_dir)
    return study
