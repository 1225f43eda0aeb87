"""Question: does the dose iso-KL gives each method (p95 of per-token KL over rollouts = 1 nat) agree
with the dose a teacher-forced measure gives it (the mean rise in cross-entropy on a fixed text
corpus, `--statistic delta_ce`)? If the two budgets rank the methods' coefficients differently, a
comparison "at the same strength" depends on which strength is meant.

For mean_diff, pca and a random direction at the embedded model's default layer: c* under p95 KL
(target 1 nat, the main job's calibration prompts and window), the corpus delta-CE at that c*; then
c* under delta_ce with the target set to mean_diff's delta-CE at its iso-KL c* (so that mean_diff's
two coefficients agree by construction), and the p95 KL each method's delta-CE coefficient gives.
Regenerates figures/statistic_comparison.md:

    python analyses/statistic_comparison.py        # about 2 minutes on 2 CPU cores
"""

from pathlib import Path

import torch

from isokl_tl import RunConfig, calibrate, compute_direction, load_model
from isokl_tl.corpus import corpus_ids, delta_ce, token_ce
from isokl_tl.hooks import Site, resolve_hook
from isokl_tl.prompts import load_corpus, load_pairs, load_prompts
from isokl_tl.rollout import rollout
from isokl_tl.search import CalibrationSettings, kl_statistic
from isokl_tl.tokens import prompt_ids

METHODS = ("mean_diff", "pca", "random")
ROOT = Path(__file__).resolve().parent.parent


def corpus_delta_ce(model, direction, ids: list[list[int]], coeff: float) -> float:
    site, zeros = Site(direction.hook, direction.vector), torch.zeros(len(ids), dtype=torch.long)
    d, mask = delta_ce(token_ce(model, ids, torch.full((len(ids),), coeff), sites=[site], site=zeros),
                       token_ce(model, ids, torch.zeros(len(ids)), sites=[site], site=zeros))
    return float(d[mask].mean())


def rollout_p95(model, direction, prompts: list[list[int]], coeff: float, window: int) -> float:
    r = rollout(model, prompts, torch.full((len(prompts),), coeff), direction=direction.vector, hook=direction.hook,
                window=window)
    kl, mask = r.kl.numpy(), r.mask.numpy()
    return kl_statistic([kl[i][mask[i]] for i in range(len(kl))], "quantile", 0.95)


if __name__ == "__main__":
    cfg = RunConfig()
    model = load_model(cfg.model)
    hook = resolve_hook(model, cfg.hook, cfg.layer)
    prompts = [prompt_ids(model.tokenizer, p) for p in load_prompts(cfg.calib_prompts)[: cfg.n_calib]]
    passages = corpus_ids(model.tokenizer, load_corpus(cfg.corpus)[: cfg.n_calib])
    kl_settings = cfg.calibration_settings()
    rows, target_ce = [], None
    for method in METHODS:
        d = compute_direction(model, load_pairs(cfg.pairs), hook, method, seed=cfg.seed)
        by_kl = calibrate(model, d, prompts, kl_settings, progress=True)
        ce_at_kl = corpus_delta_ce(model, d, passages, by_kl.c_star)
        target_ce = ce_at_kl if target_ce is None else target_ce       # mean_diff's, for every method
        by_ce = calibrate(model, d, passages, CalibrationSettings(statistic="delta_ce", target=target_ce,
                                                                  bootstrap=cfg.bootstrap), progress=True)
        rows.append((method, by_kl, ce_at_kl, by_ce, rollout_p95(model, d, prompts, by_ce.c_star, cfg.calib_window)))
        print(f"{method}: c*(p95 KL) {by_kl.c_star:.4g}, delta-CE there {ce_at_kl:.4g}; "
              f"c*(delta-CE {target_ce:.4g}) {by_ce.c_star:.4g}, p95 KL there {rows[-1][-1]:.4g}")

    def interval(cal):
        return f" ({cal.interval[0]:.3g}-{cal.interval[1]:.3g})" if cal.interval else ""

    lines = [f"c* under two budgets, {cfg.model} at {hook}: p95 of per-token KL over {cfg.calib_window}-token "
             f"rollouts of {cfg.n_calib} `{cfg.calib_prompts}` prompts = {kl_settings.target:g} nat, and the mean "
             f"rise in cross-entropy on {cfg.n_calib} `{cfg.corpus}` passages ({sum(len(p) - 1 for p in passages)} "
             f"tokens, teacher-forced) = {target_ce:.3g} nat (mean_diff's value at its iso-KL c*). 90% bootstrap "
             "intervals over prompts / passages. `python analyses/statistic_comparison.py`", "",
             "| method | c* (p95 KL) | delta-CE at it | c* (delta-CE) | p95 KL at it | c* ratio delta-CE / KL |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, by_kl, ce_at_kl, by_ce, kl_at_ce in rows:
        lines.append(f"| {method} | {by_kl.c_star:.4g}{interval(by_kl)} | {ce_at_kl:.3g} | "
                     f"{by_ce.c_star:.4g}{interval(by_ce)} | {kl_at_ce:.3g} | {by_ce.c_star / by_kl.c_star:.2f} |")
    out = ROOT / "figures" / "statistic_comparison.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
