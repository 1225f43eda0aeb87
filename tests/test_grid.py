"""Studies: a grid of cells run by the local executor, its report, resume and faults."""

import itertools
import json

import pandas as pd
import pytest
from click.testing import CliRunner
from isokl_tl_cli.main import main
from parity import result_files

from isokl_tl.grid import Grid

SHARED = """
[shared]
model = "tiny-random"
window = 16
n_prompts = 3
calib_window = 12
n_calib = 3
fork_every = 8
keep_weak = true
bootstrap = 20
alphas = [0, 1, 2]
"""


def _grid(tmp_path, axes: str, extra: str = ""):
    f = tmp_path / "grid.toml"
    f.write_text(SHARED + extra + "\n[axes]\n" + axes)
    return f


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_a_grid_runs_its_cells_writes_the_report_and_reruns_nothing(tmp_path):
    grid = _grid(tmp_path, 'method = ["mean_diff", "pca"]\nlayer = [1, 2]\n')
    study = tmp_path / "study"
    dry = _invoke(["grid", "--config", str(grid), "--out", str(study), "--dry-run"])
    assert dry.exit_code == 0 and "4 cells" in dry.output and not study.exists()
    res = _invoke(["grid", "--config", str(grid), "--out", str(study), "--workers", "2"])
    assert res.exit_code == 0, res.output
    cells = sorted(p.name for p in (study / "cells").iterdir())
    assert cells == ["method-mean_diff__layer-1", "method-mean_diff__layer-2", "method-pca__layer-1",
                     "method-pca__layer-2"]
    state = json.loads((study / "grid.json").read_text())
    assert state["counts"]["done"] == 4
    report = pd.read_csv(study / "report.csv")
    assert len(report) == 4 * 3 and set(report.method) == {"mean_diff", "pca"} and set(report.layer) == {1, 2}
    assert (report.c_star_lo <= report.c_star).all() and (report.c_star <= report.c_star_hi).all()
    assert (study / "report.md").exists() and (study / "report.png").stat().st_size > 10_000
    again = _invoke(["grid", "--config", str(grid), "--out", str(study), "--workers", "2"])
    assert again.exit_code == 0 and "4 of 4 cells complete already" in again.output
    assert _invoke(["grid", "report", str(study)]).exit_code == 0


def test_a_failed_cell_is_recorded_the_others_finish_and_a_killed_worker_resumes(tmp_path, monkeypatch):
    grid = _grid(tmp_path, 'layer = [1, 99]\n', extra='rows_per_batch = 4\n')
    study = tmp_path / "study"
    res = _invoke(["grid", "--config", str(grid), "--out", str(study)])
    assert res.exit_code == 1
    state = json.loads((study / "grid.json").read_text())["cells"]
    assert state["layer-1"]["state"] == "done" and state["layer-99"]["state"] == "failed"
    assert "layer 99" in state["layer-99"]["error"] and "\n" not in state["layer-99"]["error"]
    assert "Traceback" in (study / "cells" / "layer-99" / "error.txt").read_text()
    # a worker killed mid-sweep: its cell is failed, with its saved parts kept; a rerun resumes it
    grid = _grid(tmp_path, 'layer = [2]\n', extra='rows_per_batch = 4\n')
    monkeypatch.setenv("ISOKL_TL_KILL_AFTER", "rollout:0")
    res = _invoke(["grid", "--config", str(grid), "--out", str(study)])
    assert res.exit_code == 1
    cell = json.loads((study / "grid.json").read_text())["cells"]["layer-2"]
    assert cell["state"] == "failed" and "died" in cell["error"]
    assert list((study / "cells" / "layer-2" / ".partial").glob("rollout-*/*"))
    monkeypatch.delenv("ISOKL_TL_KILL_AFTER")
    res = _invoke(["grid", "--config", str(grid), "--out", str(study)])
    assert res.exit_code == 0, res.output
    # ... to exactly what `isokl-tl run` makes, uninterrupted, with the cell's settings (one worker
    # uses every core, as the command does: float sums depend on the thread count)
    whole = tmp_path / "whole"
    args = ["run", "--model", "tiny-random", "--window", "16", "--n-prompts", "3", "--calib-window", "12",
            "--n-calib", "3", "--fork-every", "8", "--keep-weak", "--bootstrap", "20", "--alphas",
            "0 1 2", "--rows-per-batch", "4", "--layer", "2", "--out", str(whole)]
    assert _invoke(args).exit_code == 0
    assert result_files(study / "cells" / "layer-2") == result_files(whole)


@pytest.mark.parametrize("axes,msg", [
    ('methd = ["pca"]\n', "unknown setting 'methd'"),
    ('method = ["pca", "nope"]\n', "cell method-nope: unknown direction method 'nope'"),
    ('method = "pca"\n', "axis 'method' must be a non-empty list"),
    ('window = [8, 8]\n', "repeats a value"),
])
def test_a_bad_grid_is_one_line_before_anything_runs(tmp_path, axes, msg):
    grid = _grid(tmp_path, axes)
    res = CliRunner().invoke(main, ["grid", "--config", str(grid), "--out", str(tmp_path / "s")])
    assert res.exit_code != 0 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "s").exists()


def test_exclusions_leave_cells_out():
    grid = Grid.from_dict({"shared": {"model": "tiny-random"}, "axes": {"method": ["mean_diff", "pca"], "layer": [1, 2]},
                           "exclude": [{"method": "pca", "layer": 2}]})
    assert [c.name for c in grid.cells()] == ["method-mean_diff__layer-1", "method-mean_diff__layer-2",
                                              "method-pca__layer-1"]


def test_ray_and_submitit_executors_give_the_local_executors_cells_byte_for_byte(tmp_path):
    """The same two cells through the local executor (two workers: one thread each), a local Ray
    (2 CPUs, a task per cell) and submitit's local executor (a job array): identical files."""
    grid = _grid(tmp_path, 'layer = [1, 2]\n')
    runs = {"local": ["--workers", "2"], "ray": ["--executor", "ray", "--workers", "2"],
            "slurm": ["--executor", "slurm", "--slurm-local"]}
    for name, extra in runs.items():
        res = _invoke(["grid", "--config", str(grid), "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, (name, res.output)
    for cell in ("layer-1", "layer-2"):
        local = result_files(tmp_path / "local" / "cells" / cell)
        assert len(local) >= 15
        for name in ("ray", "slurm"):
            assert result_files(tmp_path / name / "cells" / cell) == local, (name, cell)


def test_a_ray_worker_that_dies_leaves_its_cell_failed_and_another_takes_the_queue(tmp_path, monkeypatch):
    """One Ray worker (an actor keeping its model): the first cell's process SIGKILLs itself in its
    second sweep part, so that cell is failed with its saved parts; a new worker runs the second
    cell (one part only, never killed); the rerun resumes the first."""
    grid = _grid(tmp_path, 'rows_per_batch = [4, 100]\n', extra='layer = 2\n')
    study = tmp_path / "study"
    monkeypatch.setenv("ISOKL_TL_KILL_AFTER", "rollout:1")
    res = _invoke(["grid", "--config", str(grid), "--out", str(study), "--executor", "ray", "--workers", "1"])
    assert res.exit_code == 1
    cells = json.loads((study / "grid.json").read_text())["cells"]
    assert cells["rows_per_batch-4"]["state"] == "failed" and cells["rows_per_batch-100"]["state"] == "done"
    assert list((study / "cells" / "rows_per_batch-4" / ".partial").glob("rollout-*/*"))
    monkeypatch.delenv("ISOKL_TL_KILL_AFTER")
    res = _invoke(["grid", "--config", str(grid), "--out", str(study), "--executor", "ray", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads((study / "grid.json").read_text())["counts"]["done"] == 2


def test_a_missing_executor_extra_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)          # import ray -> ImportError
    grid = _grid(tmp_path, 'layer = [1]\n')
    res = CliRunner().invoke(main, ["grid", "--config", str(grid), "--out", str(tmp_path / "s"), "--executor", "ray"])
    assert res.exit_code != 0 and "pip install 'isokl-tl[ray]'" in res.output


def test_seeds_resample_the_pairs_and_the_report_spans_them(tmp_path, tiny):
    """With resample_pairs, a seed draws the pairs (with replacement) the direction is built from:
    other seeds, other directions; the study's report gives the spread over seeds."""
    import torch

    from isokl_tl.directions import compute_direction
    from isokl_tl.prompts import load_pairs

    pairs = load_pairs()[:8]
    hook = "blocks.2.hook_resid_post"
    a, b = (compute_direction(tiny, pairs, hook, seed=s, resample=True) for s in (1, 2))
    again = compute_direction(tiny, pairs, hook, seed=1, resample=True)
    assert torch.equal(a.vector, again.vector) and not torch.equal(a.vector, b.vector)
    drawn = a.extra["resampled_pairs"]
    assert len(drawn) == 8 and len(set(drawn)) < 8                  # with replacement
    chosen = compute_direction(tiny, [pairs[i] for i in drawn], hook)
    torch.testing.assert_close(a.vector, chosen.vector)
    grid = _grid(tmp_path, 'seed = [1, 2]\n', extra="resample_pairs = true\n")
    study = tmp_path / "study"
    assert _invoke(["grid", "--config", str(grid), "--out", str(study)]).exit_code == 0
    seeds = pd.read_csv(study / "report_seeds.csv")
    report = pd.read_csv(study / "report.csv")
    assert list(seeds.seeds.unique()) == [2] and len(seeds) == 3          # per alpha, over both seeds
    assert seeds.c_star_min.iloc[0] == report.c_star.min() and seeds.c_star_max.iloc[0] == report.c_star.max()
    assert report.c_star.nunique() == 2


def test_the_facets_put_models_in_rows_methods_in_columns_and_pool_seeds():
    """report_facets.png: a panel per model and method, a line per layer in the same colour in every
    panel, seeds pooled into one line (mean, the range shaded), each line labelled with its c*."""
    from isokl_tl.plots import plot_study_facets

    rows = []
    for model, method, layer, seed in itertools.product(["a/m1.gguf", "m2"], ["mean_diff", "random"], [1, 2], [0, 1]):
        c = 10.0 * layer + seed
        for alpha, s_end in [(0, 1.0), (1, 0.5 + 0.25 * seed), (2, 0.0)]:
            rows.append(dict(cell=f"{model}-{method}-{layer}-{seed}", model=model, method=method, layer=layer,
                             seed=seed, c_star=c, c_star_lo=c - 1, c_star_hi=c + 1, converged=True,
                             heldout_alpha1=1.0, alpha=alpha, n=4, died=2, censored=2, S_mid=1.0, S_end=s_end,
                             median=float("inf"), median_lo=0.0, median_hi=float("inf")))
    axes = plot_study_facets(pd.DataFrame(rows))
    assert [ax.get_title() for ax in axes] == ["m1.gguf · mean_diff", "m1.gguf · random", "m2 · mean_diff", "m2 · random"]
    for ax in axes:
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == ["layer 1: c* 10.5 (10-11 over 2)", "layer 2: c* 20.5 (20-21 over 2)"]
        assert len(ax.collections) == 2                               # the seeds' range, one band per line
        assert [line.get_color() for line in ax.get_lines()] == [line.get_color() for line in axes[0].get_lines()]
    mean = axes[0].get_lines()[0].get_ydata()
    assert abs(mean[1] - 0.625) < 0.02                                 # mean over the seeds (nudged <= 0.015)


def test_the_facets_take_axes_of_lists_and_missing_cells():
    """Axis values that are lists (alphas, say) are labels; a model x method pair with no finished
    cell gets a panel that says so."""
    from isokl_tl.plots import plot_study_facets

    rows = [dict(cell=f"c{i}", model=m, method=meth, alphas=[0, 1, i], c_star=1.0, c_star_lo=0.9, c_star_hi=1.1,
                 converged=i != 1, heldout_alpha1=1.0, alpha=a, n=2, died=0, censored=2, S_mid=1.0, S_end=1.0,
                 median=float("inf"), median_lo=float("inf"), median_hi=float("inf"))
            for i, (m, meth) in enumerate([("m1", "pca"), ("m1", "random"), ("m2", "pca")]) for a in (0, 1)]
    axes = plot_study_facets(pd.DataFrame(rows))
    assert [t.get_text() for t in axes[3].texts] == ["no finished cell"]
    assert axes[0].get_lines()[0].get_label() == "alphas [0, 1, 0]: c* 1 (0.9-1.1)"
    assert axes[1].get_lines()[0].get_label().endswith("(0.9-1.1, not converged)")
