"""Bad input through the CLI, killed-and-resumed runs, byte-identical reruns."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from isokl_tl_cli.main import main
from parity import result_files
from safetensors.torch import save_file

BASE = ["--model", "tiny-random", "--calib-window", "12", "--n-calib", "3", "--bootstrap", "20"]
SWEEP = ["--window", "16", "--n-prompts", "6", "--alphas", "0 1 2", "--fork-every", "8",
         "--keep-weak", "--rows-per-batch", "4"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "run"
    res = CliRunner().invoke(main, ["calibrate", *BASE, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _jsonl(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _cases(tmp_path, calibrated):
    """(args, expected message) for every bad input of DESIGN.md section 6 and issue 7."""
    run = str(_copy(calibrated, tmp_path))
    wrong_size, nan_dir = tmp_path / "w", tmp_path / "n"
    for d, vec in ((wrong_size, torch.ones(7)), (nan_dir, torch.full((64,), float("nan")))):
        shutil.copytree(calibrated, d)
        (d / "calibration.json").unlink()
        save_file({"vector": vec}, str(d / "direction.safetensors"))
    toml = tmp_path / "bad.toml"
    toml.write_text('model = "tiny-random"\nanswer_true = ["yes"]\nanswer_false = ["yes"]\n')
    toml2 = tmp_path / "bad2.toml"
    toml2.write_text('model = "tiny-random"\nanswer_true = [""]\n')
    return {
        "unknown hook": (["direction", "--model", "tiny-random", "--hook", "blocks.1.hook_resid_pots",
                          "--out", "d1"], r"unknown hook name 'blocks\.1\.hook_resid_pots'; closest valid names: blocks\.1\.hook_resid_post"),
        "layer out of range": (["direction", "--model", "tiny-random", "--layer", "4", "--out", "d2"],
                               r"layer 4 is out of range: this model has layers 0\.\.3"),
        "not a residual site": (["direction", "--model", "tiny-random", "--hook", "blocks.1.attn.hook_q",
                                 "--out", "d3"], r"'blocks\.1\.attn\.hook_q' is not a residual-stream site"),
        "direction of wrong size": (["calibrate", *BASE, "--out", str(wrong_size)],
                                    r"direction has shape \(7,\); expected \(64,\)"),
        "direction with NaN": (["calibrate", *BASE, "--out", str(nan_dir)], r"direction contains NaN"),
        "empty prompt file": (["rollout", "--run", run, "--prompts", _jsonl(tmp_path, "e.jsonl", "\n")],
                              r"prompt file .*e\.jsonl is empty"),
        "malformed prompt file": (["rollout", "--run", run, "--prompts",
                                   _jsonl(tmp_path, "m.jsonl", '{"prompt": "ok"}\n{"prompt": oops}\n')],
                                  r"m\.jsonl line 2: not valid JSON"),
        "prompt longer than context": (["rollout", "--run", run, "--prompts",
                                        _jsonl(tmp_path, "l.jsonl", json.dumps({"prompt": "word " * 600}) + "\n"), "--n-prompts", "1"],
                                       r"prompt 0 of .*l\.jsonl. has \d+ tokens; with \d+ more .* exceeds the model.s context of 512"),
        "answer words that do not tokenize": (["run", "--config", str(toml2), "--out", "d4"] + SWEEP,
                                              r"answer word '' does not tokenize"),
        "overlapping answer sets": (["run", "--config", str(toml), "--out", "d5"] + SWEEP,
                                    r"true and false answer sets overlap"),
        "threshold outside (0, 1)": (["survival", "--run", run, "--threshold", "1.2"],
                                     r"threshold must be in \(0, 1\), got 1\.2"),
        "non-positive window": (["rollout", "--run", run, "--window", "0"], r"window must be positive, got 0"),
        "negative ablation coefficient": (["run", *BASE, "--method", "directional_ablation", "--alphas",
                                           "-1 1", "--out", "d6"], r"directional ablation needs alphas >= 0, got -1"),
        "unreachable target": (["calibrate", *BASE, "--target-kl", "500", "--out", "d7"],
                               r"(saturates below|not reached).*history: c="),
        "NaN or inf logits": (["rollout", "--run", run, "--alphas", "0 1e38", "--window", "8"],
                              r"NaN or inf logits at generated token 0 of row \d+"),
        "run dir of another config": (["calibrate", *BASE, "--method", "pca", "--out", run],
                                      r"was made with a different config \(method: 'mean_diff' there, 'pca' here\); pass --force"),
    }


CASES = ["unknown hook", "layer out of range", "not a residual site", "direction of wrong size",
         "direction with NaN", "empty prompt file", "malformed prompt file", "prompt longer than context",
         "answer words that do not tokenize", "overlapping answer sets", "threshold outside (0, 1)",
         "non-positive window", "negative ablation coefficient", "unreachable target", "NaN or inf logits",
         "run dir of another config"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_nonzero(case, tmp_path, monkeypatch, calibrated):
    monkeypatch.chdir(tmp_path)
    args, msg = _cases(tmp_path, calibrated)[case]
    res = CliRunner().invoke(main, args)
    err = res.stderr
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 1, res.output
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(msg, errors[0]), errors[0]


def test_force_overwrites_a_run_of_another_config(tmp_path, calibrated):
    run = _copy(calibrated, tmp_path)
    res = CliRunner().invoke(main, ["calibrate", *BASE, "--method", "pca", "--force", "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "direction.json").read_text())["method"] == "pca"


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="layer 9"):
        CliRunner().invoke(main, ["--debug", "direction", "--model", "tiny-random", "--layer", "9",
                                  "--out", "x"], catch_exceptions=False)


# --- killed and resumed, byte for byte ----------------------------------------------------------
def _cli(out: Path, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("ISOKL_TL_KILL_AFTER", None)
    if kill:
        env["ISOKL_TL_KILL_AFTER"] = kill
    return subprocess.run([sys.executable, "-m", "isokl_tl_cli.main", "run", *BASE, *SWEEP, *extra,
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    res = _cli(out)
    assert res.returncode == 0, res.stderr
    return result_files(out)


@pytest.mark.parametrize("kill", ["rollout:1", "pmass:0"])
def test_killed_run_resumes_to_identicalresult_files(tmp_path, reference, kill):
    """A sweep killed mid-way resumes from its saved parts (fork pmass read along); the pmass
    stage's own parts are those of the reference path (`--forks-after-sweep`)."""
    extra = ("--forks-after-sweep",) if kill.startswith("pmass") else ()
    if extra:
        assert _cli(tmp_path / "after", *extra).returncode == 0
        reference = result_files(tmp_path / "after")
    out = tmp_path / "run"
    res = _cli(out, *extra, kill=kill)
    assert res.returncode == -9, res.stderr          # SIGKILL, mid-stage
    stage = kill.split(":")[0]
    assert list((out / ".partial").glob(f"{stage}-*/*"))   # the parts done so far were kept
    res = _cli(out, *extra)
    assert res.returncode == 0, res.stderr
    assert f"[{stage}] running" in res.stderr and "[calibrate] up to date" in res.stderr
    assert result_files(out) == reference
    assert not list((out / ".partial").glob("*/*"))      # parts are cleaned up once merged


def test_same_command_twice_gives_the_same_bytes(tmp_path, reference):
    out = tmp_path / "run"
    assert _cli(out).returncode == 0
    got = result_files(out)
    assert set(got) == set(reference) and len(got) >= 15
    assert got == reference


def test_sampled_runs_repeat_for_the_same_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, "3"), (b, "3"), (c, "4")):
        assert _cli(out, "--temperature", "1.0", "--seed", seed).returncode == 0
    assert (a / "rollouts.safetensors").read_bytes() == (b / "rollouts.safetensors").read_bytes()
    assert (a / "rollouts.safetensors").read_bytes() != (c / "rollouts.safetensors").read_bytes()


def test_a_sampled_run_resumed_with_other_rows_per_batch_equals_an_uninterrupted_one(tmp_path):
    """Rows per batch cut the sweep into parts, and sampled parts are seeded by their index: parts
    saved under one cut are never reused under another. (Both values hold a whole calibration
    round, so the calibration batches, and thus c*, are the same in both runs.)"""
    sampled = ["--temperature", "1.0", "--seed", "5"]
    whole = tmp_path / "whole"
    assert _cli(whole, *sampled, "--rows-per-batch", "12").returncode == 0
    out = tmp_path / "run"
    res = _cli(out, *sampled, "--rows-per-batch", "9", kill="rollout:0")   # 9 of 18 rows saved, killed
    assert res.returncode == -9, res.stderr
    assert len(list((out / ".partial").glob("rollout-*/*"))) == 1
    res = _cli(out, *sampled, "--rows-per-batch", "12")
    assert res.returncode == 0, res.stderr
    assert "[rollout] 1 saved part(s) were cut with other settings" in res.stderr
    assert "[calibrate] up to date" in res.stderr
    assert result_files(out) == result_files(whole)


def test_a_sweep_resumed_under_other_fork_settings_does_not_mix_fork_reads(tmp_path):
    """The parts of a killed sweep carry the fork pmass read under the settings of the time; resumed
    with another fork schedule, the saved parts are reused (the rollouts are the same) but their
    reads are not: every rollout's forks follow the new schedule."""
    out = tmp_path / "run"
    res = _cli(out, kill="rollout:0")
    assert res.returncode == -9, res.stderr
    res = subprocess.run([sys.executable, "-m", "isokl_tl_cli.main", "run", *BASE, *SWEEP, "--fork-every", "4",
                          "--out", str(out)], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "ISOKL_TL_KILL_AFTER"})
    assert res.returncode == 0, res.stderr
    import pandas as pd

    from isokl_tl.rollout import Rollouts

    pm = pd.read_csv(out / "pmass.csv")
    r = Rollouts.load(out)
    content = (r.gen_len - r.eos.long()).tolist()
    for row in range(r.n_rows):        # rows of the part saved before the kill included
        assert set(pm[pm.row == row].fork) == {t for t in range(0, 17, 4) if t <= content[row]}, row
