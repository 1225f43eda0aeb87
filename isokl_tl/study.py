"""The report of a study (`isokl_tl.grid`): one long-format table over cells x alphas, read from the
cells' run directories, and figures that compare cells.

Per (cell, alpha): the cell's axis values; c* with its 90% bootstrap interval and whether the
search converged (the cell's calibration); the held-out statistic at alpha 1 over the whole window
(`calibration_transfer.json`, where there is one; for -v's rows, -v's at alpha -1); and the survival table's n, died, censored,
S(mid), S(end), the median death token with its 95% interval (inf: not reached).
"""

import json
from pathlib import Path

import pandas as pd

from isokl_tl.grid import CELLS, GRID
from isokl_tl.manifest import write_atomic, write_csv
from isokl_tl.survival import format_token

REPORT_CSV, REPORT_MD, REPORT_FIG = "report.csv", "report.md", "report.png"
FACETS_FIG = "report_facets.png"
SEEDS_CSV, SEEDS_MD = "report_seeds.csv", "report_seeds.md"
COLUMNS = ["c_star", "c_star_lo", "c_star_hi", "converged", "heldout_alpha1", "alpha", "n", "died", "censored",
           "S_mid", "S_end", "median", "median_lo", "median_hi"]


def study_table(study: str | Path) -> pd.DataFrame:
    """The table over the study's finished cells (grid.json says which), axes first."""
    study = Path(study)
    if not (study / GRID).exists():
        raise ValueError(f"{study} holds no study ({GRID}); run `isokl-tl grid --config FILE --out {study}`")
    cells = json.loads((study / GRID).read_text())["cells"]
    axes = list(next(iter(cells.values()))["axes"]) if cells else []
    rows = []
    for name, c in cells.items():
        if c["state"] != "done":
            continue
        d = study / CELLS / name
        cals = {1: json.loads((d / "calibration.json").read_text())}
        if (d / "calibration_negative.json").exists():            # --sign both: -v's for negative alphas
            cals[-1] = json.loads((d / "calibration_negative.json").read_text())
        moved = d / "calibration_transfer.json"
        moved = json.loads(moved.read_text()) if moved.exists() else {}
        table = pd.read_csv(d / "survival_table.csv")
        for t in table.to_dict("records"):
            cal = cals[-1] if t["alpha"] < 0 and -1 in cals else cals[1]
            lo, hi = cal["interval"] or (float("nan"), float("nan"))
            held = moved.get("negative", {}) if cal is cals.get(-1) else moved
            rows.append({"cell": name, **c["axes"], "c_star": cal["c_star"], "c_star_lo": lo, "c_star_hi": hi,
                         "converged": cal["converged"],
                         "heldout_alpha1": held.get("whole_window", {}).get("value", float("nan")), **t})
    return pd.DataFrame(rows, columns=["cell", *axes, *COLUMNS])


def report_markdown(table: pd.DataFrame) -> str:
    axes = [c for c in table.columns if c not in ("cell", *COLUMNS)]
    head = [*axes, "c* (90% CI)", "conv.", "held-out KL at 1", "alpha", "n", "died", "S(end)", "median token (95% CI)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples(index=False):
        d = r._asdict()
        ci = f" ({d['c_star_lo']:.3g}-{d['c_star_hi']:.3g})" if pd.notna(d["c_star_lo"]) else ""
        lines.append("| " + " | ".join([*(str(d[a]) for a in axes), f"{d['c_star']:.4g}{ci}", "yes" if d["converged"] else "no",
                                        f"{d['heldout_alpha1']:.3g}", f"{d['alpha']:g}", str(d["n"]), str(d["died"]),
                                        f"{d['S_end']:.2f}",
                                        f"{format_token(d['median'])} ({format_token(d['median_lo'])}-"
                                        f"{format_token(d['median_hi'])})"]) + " |")
    return "\n".join(lines) + "\n"


def seed_table(table: pd.DataFrame) -> pd.DataFrame:
    """Across seeds, for a study with a `seed` axis: per combination of the other axes and alpha,
    the seeds behind it and the mean, min and max of c* and of S(end) over them. (With
    `resample_pairs`, a seed draws the pairs the direction is built from, so the spread is how much
    the result owes to the particular pairs.)"""
    axes = [c for c in table.columns if c not in ("cell", "seed", *COLUMNS)]
    out = (table.groupby([*axes, "alpha"], sort=False)
           .agg(seeds=("seed", "nunique"), c_star=("c_star", "mean"), c_star_min=("c_star", "min"),
                c_star_max=("c_star", "max"), S_end=("S_end", "mean"), S_end_min=("S_end", "min"),
                S_end_max=("S_end", "max"))
           .reset_index())
    return out


def seeds_markdown(seeds: pd.DataFrame) -> str:
    axes = [c for c in seeds.columns if c not in ("alpha", "seeds", "c_star", "c_star_min", "c_star_max", "S_end",
                                                    "S_end_min", "S_end_max")]
    head = [*axes, "alpha", "seeds", "c* mean (min-max)", "S(end) mean (min-max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in seeds.to_dict("records"):
        lines.append("| " + " | ".join([*(str(r[a]) for a in axes), f"{r['alpha']:g}", str(r["seeds"]),
                                        f"{r['c_star']:.4g} ({r['c_star_min']:.4g}-{r['c_star_max']:.4g})",
                                        f"{r['S_end']:.2f} ({r['S_end_min']:.2f}-{r['S_end_max']:.2f})"]) + " |")
    return "\n".join(lines) + "\n"


def write_report(study: str | Path) -> pd.DataFrame:
    """report.csv, report.md, report.png and report_facets.png in the study directory (and, for a study with a `seed`
    axis, the across-seed table report_seeds.csv/.md); returns the table."""
    from isokl_tl.plots import plot_study, plot_study_facets, save_figure

    study = Path(study)
    table = study_table(study)
    write_csv(study / REPORT_CSV, table)
    write_atomic(study / REPORT_MD, lambda p: p.write_text(report_markdown(table)))
    if len(table):
        save_figure(plot_study(table), study / REPORT_FIG)
        save_figure(plot_study_facets(table), study / FACETS_FIG)
    if "seed" in table.columns and table.seed.nunique() > 1:
        seeds = seed_table(table)
        write_csv(study / SEEDS_CSV, seeds)
        write_atomic(study / SEEDS_MD, lambda p: p.write_text(seeds_markdown(seeds)))
    return table
