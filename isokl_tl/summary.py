"""What a finished run directory shows a reader: every figure, and `summary.md`; and the table and
figure that compare the runs of several methods."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from isokl_tl import manifest as files  # the run directory's file names
from isokl_tl.answers import answer_table, answers_markdown
from isokl_tl.calibrate import CORPUS_STATISTICS, Calibration, load_calibrations, statistic_label
from isokl_tl.coherence import TEXT_SIGNALS, first_signal, signal_table, signals_markdown, unsteered_levels, unsteered_markdown
from isokl_tl.directions import Direction
from isokl_tl.manifest import write_atomic, write_csv, write_json
from isokl_tl.pmass import ForkPMass
from isokl_tl.prompts import known_answers
from isokl_tl.rollout import Rollouts
from isokl_tl.survival import SurvivalTable, format_token, sweep_markdown
from isokl_tl.transfer import heldout_kl, transfer, transfer_line


def write_figures(run_dir: Path, cfg, meanwhile: Callable[[], None] | None = None) -> None:
    """Every figure of a run, drawn side by side (`plots.save_figures`), the slowest first;
    `meanwhile()` runs in this process while they are drawn."""
    from isokl_tl.plots import (
        plot_aggregate,
        plot_calibration,
        plot_dose_response,
        plot_spaghetti,
        plot_survival,
    )
    from isokl_tl.plots.style import save_figures

    r = Rollouts.load(run_dir)
    cal = Calibration.load(run_dir)
    pm = ForkPMass.load(run_dir)
    st = SurvivalTable.load(run_dir)
    fig = files.FIGURES
    by_signal = pd.read_csv(run_dir / files.SIGNALS) if (run_dir / files.SIGNALS).exists() else None

    def dose_response():
        kl = heldout_kl(r, cal, bootstrap=min(cfg.bootstrap, 200), seed=cfg.seed)
        return plot_dose_response(st, by_signal=by_signal, kl=kl if len(kl) else None)

    save_figures([
        (lambda: plot_spaghetti(r, deaths=st.per_row, target=cal.target, death_signal=cfg.death_signal),
         run_dir / fig["spaghetti"]),
        (lambda: plot_aggregate(r, pm.frame, target=cal.target), run_dir / fig["aggregate"]),
        (lambda: plot_spaghetti(r, deaths=st.per_row, normalise_k=16, skip_first=True,
                                death_signal=cfg.death_signal), run_dir / fig["normalised"]),
        (dose_response, run_dir / fig["dose_response"]),
        (lambda: plot_calibration(cal), run_dir / fig["calibration"]),
        (lambda: plot_survival(st.curves, window=st.window), run_dir / fig["survival"]),
    ], meanwhile)


def write_threshold_sweep(run_dir: Path, sweep: pd.DataFrame) -> None:
    """`survival.threshold_sweep`'s table as CSV and Markdown, and its figure."""
    from isokl_tl.plots import plot_threshold_sweep, save_figure

    write_csv(run_dir / files.THRESHOLD_SWEEP, sweep)
    write_atomic(run_dir / files.THRESHOLD_SWEEP_MD, lambda p: p.write_text(sweep_markdown(sweep)))
    save_figure(plot_threshold_sweep(sweep), run_dir / files.THRESHOLD_SWEEP_FIG)


def weak_text(st: SurvivalTable) -> str:
    """The weak prompts, each with why (the baseline check reads pmass, whatever the death signal):
    its unsteered pmass at fork 0, and the token where its unsteered rollout's pmass dies by the
    rule where that is later."""
    if not st.weak_prompts:
        return "none"
    first = st.per_row.drop_duplicates("prompt").set_index("prompt")
    why = []
    for p in st.weak_prompts:
        b = first.base_pmass0[p]
        reasons = [f"unsteered pmass {b:.2f} at fork 0" if np.isfinite(b) else "no unsteered pmass"]
        later = first.base_death.get(p, np.nan) if "base_death" in first else np.nan
        if later > 0:
            reasons.append(f"its unsteered rollout's pmass dies at token {later:g}")
        why.append(f"{p} ({'; '.join(reasons)})")
    return ", ".join(why)


def write_summary(run_dir: Path, cfg) -> None:
    d = Direction.load(run_dir)
    st = SurvivalTable.load(run_dir)
    rollouts = Rollouts.load(run_dir)
    reached = [(a, int((rollouts.gen_len[rollouts.alpha == a] >= rollouts.window).sum()),
                int((rollouts.alpha == a).sum())) for a in sorted(set(rollouts.alpha.tolist()))]
    cals = load_calibrations(run_dir)
    moves = {sign: transfer(rollouts, c, alpha=float(sign), bootstrap=cfg.bootstrap, seed=cfg.seed)
             for sign, c in cals.items()
             if bool((rollouts.alpha == float(sign)).any()) and c.statistic not in CORPUS_STATISTICS}
    moved = next(iter(moves.values()), None)
    if moved:
        write_json(run_dir / files.TRANSFER, {**moved, **({"negative": moves[-1]} if len(moves) > 1 else {})})
    else:
        (run_dir / files.TRANSFER).unlink(missing_ok=True)     # a sweep without alpha 1 has none
    by_signal = pd.read_csv(run_dir / files.SIGNALS)
    coherence = signals_markdown(signal_table(by_signal, cfg.window, keep_weak=cfg.keep_weak),
                                 first_signal(by_signal), cfg.coherence_thresholds())
    if (run_dir / files.COHERENCE).exists():
        levels = unsteered_levels(pd.read_csv(run_dir / files.COHERENCE), by_signal,
                                  [k for k in TEXT_SIGNALS if (by_signal.signal == k).any()])
        coherence += "\n" + unsteered_markdown(levels, cfg.coherence_thresholds())
    answers = known_answers(cfg.prompts)[: cfg.n_prompts]
    pm = ForkPMass.load(run_dir)
    table = answer_table(pm.frame, answers)
    scored = answers_markdown(table, answers) if len(table) else ""
    if scored:
        write_csv(run_dir / files.ANSWERS, table)
    lines = [
        f"# isokl-tl run: {d.label} at {d.hook} on {cfg.model}", "",
        *[c_star_line(c, cfg, signed=cfg.sign != "positive") for c in cals.values()],
        *[f"- {transfer_line(m)}" for m in moves.values()],
        f"- sweep: {cfg.n_prompts} `{cfg.prompts}` prompts x alphas {cfg.sweep_alphas()}, window "
        f"{cfg.window}, forks {cfg.forks()}",
        f"- reached the {rollouts.window}-token window (no end of turn before it): " + ", ".join(
            f"alpha {a:g} {int(n)}/{int(k)}" for a, n, k in reached),
        "- death: " + (f"pmass < {cfg.threshold}" if cfg.threshold is not None else
                        f"pmass < {cfg.relative_threshold} x the prompt's unsteered pmass at fork 0")
        + f", {cfg.death_run} consecutive fork(s)"
        + ("" if cfg.death_signal == "pmass" else
           f"; the table below counts deaths by {cfg.death_signal} (`--death-signal`), see 'Death by signal'"),
        f"- weak prompts ({'kept' if cfg.keep_weak else 'excluded'}): {weak_text(st)}",
        *thinking_lines(pm.splice.get("thinking"), pm.splice.get("close_text", "")),
        "", st.to_markdown().rstrip("\n"),
        "", coherence.rstrip("\n"),
        *(["", scored.rstrip("\n")] if scored else []),
        "", "Figures:", "",
    ] + [f"![{k}]({v})" for k, v in files.FIGURES.items()]
    write_atomic(run_dir / files.SUMMARY, lambda p: p.write_text("\n".join(lines) + "\n"))


def thinking_lines(report: dict | None, close: str = "") -> list[str]:
    """The summary's line on thinking blocks (`isokl_tl.thinking`): none for a model without them."""
    if not report:
        return []
    head = (f"- thinking blocks: {report['forks_inside']} of {report['forks']} evaluated forks fall inside an "
            f"open `{report['markers'][0]}` block; ")
    return [head + (f"the inline splice closes it there ({close!r}) and only there" if close
                    else "the inline splice does not close it (its close is turned off)")]


def c_star_line(cal: Calibration, cfg, *, signed: bool = False) -> str:
    """The calibration as one line of a summary (naming the direction's sign where `signed`)."""
    interval = f" (90% bootstrap {cal.interval[0]:.4g}-{cal.interval[1]:.4g})" if cal.interval else ""
    corpus = f" of {cfg.n_calib} `{cfg.corpus}` passages" if cal.statistic in CORPUS_STATISTICS else ""
    which = f" of {'+v' if cal.sign > 0 else '-v'}" if signed else ""
    return (f"- c*{which} = {cal.c_star:.4g}{interval}: {statistic_label(cal)} = {cal.value:.4g} nat (target "
            f"{cal.target:g} nat, {cal.n_tokens} tokens{corpus}, {cal.rounds} rounds, converged: {cal.converged})")


def write_method_comparison(runs: dict[str, Path], png: Path, markdown: Path, dose_png: Path | None = None) -> None:
    """One figure (KL bands and survival, a column per method) and one table (c*, and per alpha
    the deaths and S at the end) for finished run directories of several methods; with `dose_png`,
    also each method's dose response (a row per method: S(end) and the median death token per
    death signal, and the held-out KL statistic)."""
    from isokl_tl.plots import plot_methods, plot_methods_dose_response, save_figure

    results, doses, lines = {}, {}, ["| method | c* | alpha | n | died | S(end) | median token |",
                                     "|---|---:|---:|---:|---:|---:|---:|"]
    targets = {}
    for name, run_dir in runs.items():
        cal = Calibration.load(run_dir)
        targets[name] = (cal.statistic, cal.quantile, cal.target)
        st = SurvivalTable.load(run_dir)
        r = Rollouts.load(run_dir)
        results[name] = (r, st.curves, cal.c_star)
        by_signal = pd.read_csv(run_dir / files.SIGNALS) if (run_dir / files.SIGNALS).exists() else None
        kl = heldout_kl(r, cal)
        doses[name] = (st, by_signal, kl if len(kl) else None)
        for t in st.table.itertuples():
            lines.append(f"| {name} | {cal.c_star:.4g} | {t.alpha:g} | {t.n} | {t.died} | "
                         f"{t.S_end:.2f} | {format_token(t.median)} |")
    if len(set(targets.values())) > 1:
        raise ValueError(f"the runs were calibrated to different KL targets (statistic, quantile, target: "
                         f"{targets}): not a comparison at iso-KL")
    statistic, _, target = next(iter(targets.values()))
    # a delta_ce budget is a rise in cross-entropy, not a per-token KL: no line on the KL bands
    save_figure(plot_methods(results, target=None if statistic in CORPUS_STATISTICS else target), png)
    if dose_png is not None:
        save_figure(plot_methods_dose_response(doses), dose_png)
    write_atomic(Path(markdown), lambda p: p.write_text("\n".join(lines) + "\n"))
