import json

import click
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from isokl_tl_cli.main import main

TINY_RUN = ["--model", "tiny-random", "--window", "16", "--n-prompts", "3", "--calib-window", "12",
            "--n-calib", "3", "--fork-every", "8", "--keep-weak", "--bootstrap", "20",
            "--alphas", "0 1 2"]


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_every_command_has_help():
    for name, cmd in main.commands.items():
        assert cmd.help, f"command {name} has no help text"
        for p in cmd.params:
            if isinstance(p, click.Argument):     # click arguments take no help: the command's names them
                assert p.name.upper() in cmd.help, f"the help of {name} does not say what {p.name.upper()} is"
            else:
                assert p.help, f"option {p.name} of {name} has no help"
    assert _invoke(["--help"]).exit_code == 0


@pytest.mark.parametrize("args,msg", [
    (["direction", "--model", "nope", "--out", "X"], "unknown model spec 'nope'"),
    (["direction", "--model", "tiny-random", "--layer", "9", "--out", "X"], "layer 9 is out of range"),
    (["direction", "--model", "tiny-random", "--hook", "blocks.1.hook_resid_pots", "--out", "X"],
     "closest valid names: blocks.1.hook_resid_post"),
    (["calibrate", "--model", "tiny-random", "--quantile", "2", "--out", "X"], "quantile must be in"),
    (["calibrate", "--model", "tiny-random", "--calib-window", "0", "--out", "X"], "calib-window must be positive"),
    (["run", "--model", "tiny-random", "--method", "directional_ablation", "--alphas", "-1 1", "--out", "X"],
     "needs alphas >= 0"),
    (["run", "--model", "tiny-random", "--threshold", "1.5", "--out", "X"], "threshold must be in \\(0, 1\\)"),
])
def test_user_errors_are_one_line(tmp_path, monkeypatch, args, msg):
    import re

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    err = res.output.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error:"), err
    assert re.search(msg, err), err


def test_run_end_to_end_then_survival_reuses_pmass(tmp_path):
    out = tmp_path / "run"
    res = _invoke(["run", *TINY_RUN, "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name in ["manifest.json", "direction.safetensors", "direction.json", "calibration.json",
                 "calibration.png", "rollouts.safetensors", "rollouts.csv", "texts.jsonl",
                 "pmass.csv", "splice.json", "survival.csv", "survival_table.csv", "km_curves.csv",
                 "summary.md", "kl_spaghetti.png", "kl_spaghetti_normalised.png", "survival.png",
                 "aggregate.png"]:
        assert (out / name).exists(), name
    man = json.loads((out / "manifest.json").read_text())
    assert {"config", "versions", "model", "stages", "command"} <= set(man)
    assert man["model"]["weights_sha256"]
    before = {s: man["stages"][s]["finished"] for s in ("rollout", "pmass")}
    rollouts_mtime = (out / "rollouts.safetensors").stat().st_mtime_ns
    summary_before = (out / "summary.md").read_text()
    res = _invoke(["survival", "--run", str(out), "--relative-threshold", "0.9"])
    assert res.exit_code == 0, res.output
    # survival redraws the figures and summary.md it made stale, and says so
    assert [line for line in res.output.splitlines() if "running" in line] == [
        "[survival] running ...", "[plot] running ..."]
    assert "refreshed" in res.output
    assert "0.9 x the prompt's unsteered pmass" in (out / "summary.md").read_text() != summary_before
    man = json.loads((out / "manifest.json").read_text())
    assert {s: man["stages"][s]["finished"] for s in ("rollout", "pmass")} == before
    assert (out / "rollouts.safetensors").stat().st_mtime_ns == rollouts_mtime
    assert man["stages"]["survival"]["settings"]["relative_threshold"] == 0.9
    per_row = pd.read_csv(out / "survival.csv")
    assert np.allclose(per_row.threshold, 0.9 * per_row.base_pmass0)
    # the threshold sweep reads the same pmass and runs no stage
    res = _invoke(["survival", "--run", str(out), "--relative-threshold", "0.9", "--threshold-sweep"])
    assert res.exit_code == 0, res.output
    assert "running" not in res.output and "Under other death rules" in res.output
    sweep = pd.read_csv(out / "threshold_sweep.csv")
    assert set(sweep.rule) == {"absolute", "relative"} and set(sweep.death_run) == {1, 2, 3}
    assert (out / "threshold_sweep.md").exists() and (out / "threshold_sweep.png").exists()
    assert "calibration transfer: at alpha 1" in (out / "summary.md").read_text()
    assert json.loads((out / "calibration_transfer.json").read_text())["n_prompts"] > 0
    # coherence signals: tabulated in every run; --death-signal any lets the first of them kill
    summary = (out / "summary.md").read_text()
    assert "Death by signal" in summary and "Which signal killed first" in summary
    by_pmass = pd.read_csv(out / "survival.csv")
    res = _invoke(["survival", "--run", str(out), "--relative-threshold", "0.9", "--death-signal", "any"])
    assert res.exit_code == 0, res.output
    by_any = pd.read_csv(out / "survival.csv")
    assert (by_any.event >= by_pmass.event).all()
    assert (by_any.time <= by_pmass.time)[by_pmass.event].all()        # a pmass death, or an earlier one
    assert "counts deaths by any" in (out / "summary.md").read_text()
    signals = pd.read_csv(out / "signals.csv")
    assert set(signals.signal) == {"pmass", "repetition", "compression", "surprisal", "flip", "any"}
    # a rule under which every prompt is weak fails and writes nothing: the files stay those of
    # the last success, which the manifest still names current
    written = {name: (out / name).read_bytes() for name in ("signals.csv", "coherence.csv", "survival.csv")}
    res = _invoke(["survival", "--run", str(out), "--threshold", "0.99", "--death-signal", "any", "--drop-weak"])
    assert res.exit_code == 1 and "all 3 prompts are weak at absolute threshold 0.99" in res.output
    assert {name: (out / name).read_bytes() for name in written} == written
    # the full command with the new threshold finds every stage current
    res = _invoke(["run", *TINY_RUN, "--relative-threshold", "0.9", "--death-signal", "any", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "running" not in res.output
    # --record-acts reruns the sweep only, and the activations load with the rollouts
    res = _invoke(["rollout", "--run", str(out), "--record-acts"])
    assert res.exit_code == 0, res.output
    from isokl_tl.rollout import Rollouts
    r = Rollouts.load(out)
    assert r.acts is not None and len(r.acts.hooks) == 4 and r.acts.proj.shape[0] == r.n_rows
    assert r.acts.full["blocks.2.hook_resid_post"].dtype.itemsize == 2


def test_models_lists_specs():
    res = _invoke(["models"])
    assert "smollm2-135m-instruct" in res.output and "tiny-random" in res.output


def test_library_never_imports_click_and_exports_the_api():
    """...and its import runs no pass of the cyclic collector over what it loads (eight without
    the pause), which runs again afterwards."""
    import subprocess
    import sys

    code = ("import gc, sys; full = []; gc.callbacks.append(lambda phase, info: phase == 'start' and "
            "info['generation'] == 2 and full.append(1)); "
            "import isokl_tl; from isokl_tl import steer, calibrate, rollout, fork_pmass, "
            "kaplan_meier, load_model; print(len(full), gc.isenabled()); "
            "from isokl_tl.plots import plot_survival; "
            "print('click' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "True", "False"]


def test_toml_config(tmp_path):
    from isokl_tl.config import RunConfig

    path = tmp_path / "cell.toml"
    path.write_text('model = "tiny-random"\nwindow = 20\nalphas = [0, 1, 3]\nfork-every = 5\n')
    cfg = RunConfig.from_toml(path)
    assert cfg.window == 20 and cfg.alphas == (0.0, 1.0, 3.0) and cfg.forks() == [0, 5, 10, 15, 20]
    path.write_text('windw = 20\n')
    import pytest as _pytest
    with _pytest.raises(ValueError, match="unknown config keys \\['windw'\\]"):
        RunConfig.from_toml(path)


def test_layers_command_on_tiny(tmp_path):
    out = tmp_path / "layers"
    res = _invoke(["layers", "--model", "tiny-random", "--layers", "0:4", "--calib-window", "12",
                   "--n-calib", "3", "--n-heldout", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "layers.csv")
    from isokl_tl.layers import COLUMNS
    assert list(table.columns) == COLUMNS and list(table.layer) == [0, 1, 2, 3]
    ok = table[table.error.isna()]
    assert len(ok) >= 3
    assert (ok.c_star > 0).all() and np.allclose(ok.c_star_rel, ok.c_star / ok.resid_norm)
    assert (ok.calib_rounds >= 1).all() and ok.converged.dtype == bool   # every calibrated layer says it
    assert (ok.method == "mean_diff").all() and list(ok.hook) == [f"blocks.{i}.hook_resid_post" for i in ok.layer]
    assert ((ok.cos_mean_diff_pca > 0) & (ok.cos_mean_diff_pca <= 1 + 1e-6)).all()
    assert ok.projection_gap.notna().all() and (out / "layers.png").exists() and (out / "layers.md").exists()
    # the two small-c probes give every layer a fitted law with a slope near 2
    assert (ok.curvature_a > 0).all() and ok.loglog_slope.between(1.0, 3.0).all()
    assert (ok.law_holds_to > 0).all()
    # additive steering: ||steered - base|| at the steering layer is c* itself
    assert np.allclose(ok.delta_at_layer, ok.c_star, rtol=1e-3)
    assert (ok.delta_gain_final > 0).all() and (ok.delta_rel_final > 0).all()
    last = ok[ok.layer == 3]
    assert np.allclose(last.delta_gain_final, 1.0, rtol=1e-3)     # steering at the last layer
    prop = pd.read_csv(out / "layers_propagation.csv")
    assert set(prop.steer_layer) == set(ok.layer) and len(prop) == 4 * len(ok)
    assert (prop[prop.layer < prop.steer_layer].delta_rel < 1e-5).all()   # nothing upstream moves
    # directional ablation calibrated to the same budget, with held-out pmass under it
    assert (ok.ablation_c_star > 0).all() and (ok.ablation_pmass.between(0, 1)).all()
    assert (ok.ablation_pmass_rel > 0).all()
    assert "ablation_pmass_rel" in (out / "layers.md").read_text()


def test_curvature_fit_recovers_a_known_law():
    from isokl_tl.calibrate import Calibration
    from isokl_tl.layers import fit_curvature

    hist = [{"coeff": c, "value": 0.01 * c ** 2, "n_tokens": 1, "seconds": 0} for c in (0.5, 1, 2, 3)]
    hist.append({"coeff": 30.0, "value": 1.0, "n_tokens": 1, "seconds": 0})   # saturated: law broken
    cal = Calibration(c_star=30.0, converged=True, statistic="quantile", quantile=0.95, target=1.0,
                      window=8, n_tokens=1, rounds=2, history=hist)
    fit = fit_curvature(cal)
    assert abs(fit.a - 0.01) < 1e-9 and abs(fit.slope - 2) < 1e-9 and fit.holds_to == 3


def test_parse_layers():
    from isokl_tl.layers import parse_layers

    assert parse_layers("0:30:3", 30) == list(range(0, 30, 3))
    assert parse_layers("6,12,18", 30) == [6, 12, 18]
    with pytest.raises(ValueError, match="this model has layers 0..29"):
        parse_layers("6,40", 30)
    with pytest.raises(ValueError, match="start:stop:step or a comma list"):
        parse_layers("six", 30)


def test_method_comparison_report_on_tiny_runs(tmp_path):
    """Two methods through the same pipeline at the same budget (the random direction is the
    matched-dose control), then the side-by-side figure and table."""
    from isokl_tl.calibrate import Calibration
    from isokl_tl.config import RunConfig
    from isokl_tl.run import Run
    from isokl_tl.summary import write_method_comparison

    runs = {}
    for method in ("mean_diff", "random"):
        cfg = RunConfig(model="tiny-random", method=method, window=12, n_prompts=2, calib_window=8,
                        n_calib=2, fork_every=6, keep_weak=True, bootstrap=0, alphas=(0.0, 1.0))
        run = Run(tmp_path / method, cfg, progress=False, log=lambda m: None)
        run.run_all()
        cal = Calibration.load(run.dir)
        assert abs(cal.value / cal.target - 1) <= cal.tol        # both spend the same KL budget
        runs[method] = run.dir
    write_method_comparison(runs, tmp_path / "cmp.png", tmp_path / "cmp.md", tmp_path / "dose.png")
    assert (tmp_path / "cmp.png").stat().st_size > 10_000 and (tmp_path / "dose.png").stat().st_size > 10_000
    table = (tmp_path / "cmp.md").read_text().splitlines()
    assert len(table) == 2 + 2 * 2 and any(line.startswith("| random |") for line in table)
    # the KL panels draw the budget the runs were calibrated to, not a fixed 1 nat
    from isokl_tl.plots import plot_methods
    from isokl_tl.rollout import Rollouts
    from isokl_tl.survival import SurvivalTable
    results = {m: (Rollouts.load(d), SurvivalTable.load(d).curves, 1.0) for m, d in runs.items()}
    axes = plot_methods(results, target=0.25)
    assert [ln.get_label() for ln in axes[0, 1].get_lines() if ln.get_label().startswith("target")] == ["target 0.25 nat"]
    # runs calibrated to other budgets are no iso-KL comparison
    cal = Calibration.load(runs["random"])
    cal.target = 2.0
    cal.save(runs["random"])
    with pytest.raises(ValueError, match="different KL targets"):
        write_method_comparison(runs, tmp_path / "cmp2.png", tmp_path / "cmp2.md")


def test_layer_study_without_heldout_prompts_skips_the_ablation(tiny):
    from isokl_tl.calibrate import CalibrationSettings
    from isokl_tl.layers import layer_study
    from isokl_tl.prompts import load_pairs, load_prompts
    from isokl_tl.tokens import prompt_ids

    prompts = [prompt_ids(tiny.tokenizer, p) for p in load_prompts("calibration")[:2]]
    study = layer_study(tiny, load_pairs()[:8], prompts, [1, 3], method="pca",
                        settings=CalibrationSettings(window=8, bootstrap=0))
    t = study.table
    assert list(t.layer) == [1, 3] and (t.method == "pca").all() and t.c_star.notna().all()
    assert t[["ablation_c_star", "ablation_pmass", "ablation_pmass_rel"]].isna().all().all()
    assert set(study.propagation.steer_layer) == {1, 3}


@pytest.mark.parametrize("args", [["--alphas", "0 0.5 1"], ["--alphas", "0,0.5,1"],
                                  ["--alphas", "0", "--alphas", "0.5", "--alphas", "1"]])
def test_alphas_are_read_in_every_spelling(args):
    import click
    from isokl_tl_cli.options import sweep_options

    got = {}

    @click.command()
    @sweep_options
    def probe(**kw):
        got.update(kw)

    res = CliRunner().invoke(probe, args)
    assert res.exit_code == 0, res.output
    assert got["alphas"] == (0.0, 0.5, 1.0)


def test_version_and_help_answer_without_the_library():
    from importlib import metadata

    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"isokl-tl, version {metadata.version('isokl-tl')}"
    for cmd in ([], ["run"], ["survival"], ["layers"]):
        res = CliRunner().invoke(main, [*cmd, "--help"])
        assert res.exit_code == 0, res.output
        assert not cmd or "--out" in res.output


def test_both_signs_calibrate_and_sweep_separately(tmp_path):
    """--sign both: +v and -v each get their own c* (KL at -c differs from KL at +c), and the sweep
    holds negative alphas, rolled out at multiples of -v's c*."""
    import torch

    from isokl_tl.calibrate import load_calibrations
    from isokl_tl.rollout import Rollouts

    out = tmp_path / "both"
    res = _invoke(["run", *TINY_RUN, "--sign", "both", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cals = load_calibrations(out)
    assert set(cals) == {1, -1} and cals[1].c_star != cals[-1].c_star
    for c in cals.values():
        assert abs(c.value / c.target - 1) <= c.tol
    r = Rollouts.load(out)
    assert sorted(set(r.alpha.tolist())) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    neg, pos = r.alpha < 0, r.alpha > 0
    torch.testing.assert_close(r.coeff[neg], r.alpha[neg] * cals[-1].c_star)
    torch.testing.assert_close(r.coeff[pos], r.alpha[pos] * cals[1].c_star)
    summary = (out / "summary.md").read_text()
    assert "c* of +v" in summary and "c* of -v" in summary and "at alpha -1" in summary
    assert json.loads((out / "calibration_transfer.json").read_text())["negative"]["alpha"] == -1
    # back to one sign: -v's calibration goes, and the rollouts are redone
    res = _invoke(["run", *TINY_RUN, "--sign", "positive", "--out", str(out)])
    assert res.exit_code == 0 and not (out / "calibration_negative.json").exists()
    assert sorted(set(Rollouts.load(out).alpha.tolist())) == [0.0, 1.0, 2.0]
    bad = _invoke(["run", *TINY_RUN, "--sign", "both", "--method", "directional_ablation", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "directional ablation projects v out" in bad.output
