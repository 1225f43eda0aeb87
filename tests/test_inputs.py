"""Every input a run needs is read before any stage runs: a bad one is one line on stderr, exit
code 1, and nothing is written."""

import json
import re

import pytest
import torch
from click.testing import CliRunner
from isokl_tl_cli.main import main

RUN = ["run", "--model", "tiny-random", "--calib-window", "8", "--n-calib", "2", "--bootstrap", "0",
       "--window", "8", "--n-prompts", "2", "--alphas", "0,1", "--keep-weak"]


def _cuda() -> bool:
    return torch.cuda.is_available()


def _cases(tmp):
    (tmp / "empty.jsonl").write_text("\n")
    (tmp / "bad.jsonl").write_text('{"user": "u", "positive": "p", "negative": "n"}\n{"user": oops}\n')
    (tmp / "a_dir").mkdir()
    (tmp / "blocker").write_text("a file")
    (tmp / "one_pair.jsonl").write_text('{"user": "u", "positive": "p", "negative": "n"}\n')
    (tmp / "maybe.jsonl").write_text('{"question": "Is ice cold?", "answer": true}\n{"question": "x", "answer": "maybe"}\n')
    return {
        "prompt file is a directory": (["--prompts", str(tmp / "a_dir")], r"a_dir' is a directory, not a file"),
        "empty prompt file": (["--prompts", str(tmp / "empty.jsonl")], r"empty\.jsonl is empty"),
        "malformed pair file": (["--pairs", str(tmp / "bad.jsonl")], r"bad\.jsonl line 2: not valid JSON"),
        "missing calibration file": (["--calib-prompts", str(tmp / "nope.jsonl")],
                                     r"nope\.jsonl' does not exist; shipped sets: pairs, calibration, eval"),
        "fork-every 0": (["--fork-every", "0"], r"fork-every must be a positive number of tokens, got 0"),
        "more prompts than the file holds": (["--n-prompts", "500"],
                                             r"'longform' holds 64 prompts but --n-prompts 500 asks for more"),
        "unknown model": (["--model", "no-such-model"], r"unknown model spec 'no-such-model'"),
        "unknown hook": (["--hook", "blocks.1.hook_resid_pots"], r"unknown hook name"),
        "run directory is a file": (["--out", str(tmp / "blocker")], r"blocker' is a file, not a directory"),
        "run directory under a file": (["--out", str(tmp / "blocker" / "run")], r"blocker' is a file"),
        "a device this machine lacks": (["--device", "cuda:7"] if not _cuda() else ["--device", "cuda:99"],
                                        r"device 'cuda:\d+'"),
        "both kinds of threshold": (["--threshold", "0.9", "--relative-threshold", "0.5"],
                                    r"give one of threshold \(0\.9\) and relative-threshold \(0\.5\), not both"),
        "both fork schedules": (["--fork-every", "4", "--fork-log", "5"], r"give one of fork-every \(4\) and fork-log"),
        "too few pairs": (["--pairs", str(tmp / "one_pair.jsonl")], r"holds 1 contrastive pair\(s\); a direction needs at least 2"),
        "an answer that is not a boolean": (["--prompts", str(tmp / "maybe.jsonl"), "--n-prompts", "2"],
                                            r"maybe\.jsonl row 2: 'answer' must be true or false \(a JSON boolean\) or "
                                            r"left out, got 'maybe'"),
    }


@pytest.mark.parametrize("case", ["prompt file is a directory", "empty prompt file", "malformed pair file",
                                  "missing calibration file", "fork-every 0", "more prompts than the file holds",
                                  "unknown model", "unknown hook", "run directory is a file",
                                  "run directory under a file", "a device this machine lacks",
                                  "both kinds of threshold", "both fork schedules", "too few pairs",
                                  "an answer that is not a boolean"])
def test_bad_input_fails_before_any_stage_and_writes_nothing(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra, msg = _cases(tmp_path)[case]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "run")]
    res = CliRunner().invoke(main, RUN + extra + out)
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 1, res.output
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert re.search(msg, errors[0]), errors[0]
    assert "running" not in res.stderr                   # no stage started
    assert not (tmp_path / "run").exists()               # and nothing was written


def test_survival_that_leaves_no_prompt_says_why_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, RUN + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = (out / "manifest.json").read_bytes()
    res = CliRunner().invoke(main, ["survival", "--out", str(out), "--threshold", "0.99", "--drop-weak"])
    assert res.exit_code == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"Error: all 2 prompts are weak at absolute threshold 0\.99: unsteered pmass \d\.\d\d-\d\.\d\d at fork 0; "
        r"use --relative-threshold or --keep-weak", errors[0]), res.stderr
    assert (out / "manifest.json").read_bytes() == manifest
    res = CliRunner().invoke(main, ["survival", "--out", str(tmp_path / "missing")])
    assert res.exit_code == 1 and res.stderr.strip() == (
        f"Error: run directory '{tmp_path / 'missing'}' does not exist or holds no run; make it with "
        "`isokl-tl run`, `direction` or `calibrate`")
    assert not (tmp_path / "missing").exists()


def test_config_file_settings_win_over_defaults_and_lose_to_flags(tmp_path):
    cell = tmp_path / "cell.toml"
    cell.write_text('model = "tiny-random"\ndtype = "bfloat16"\nwindow = 6\nn_prompts = 2\n'
                    'calib_window = 8\nn_calib = 2\nbootstrap = 0\nalphas = [0, 1]\nkeep_weak = true\n')
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", "--config", str(cell), "--window", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    assert (cfg["model"], cfg["dtype"], cfg["window"], cfg["n_prompts"]) == ("tiny-random", "bfloat16", 5, 2)
    # a later stage command on the directory reuses its saved settings, and says so
    res = CliRunner().invoke(main, ["survival", "--out", str(out), "--death-run", "2"])
    assert res.exit_code == 0, res.output
    assert "reusing the settings saved in" in res.stderr and "dtype" in res.stderr
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    assert (cfg["dtype"], cfg["window"], cfg["death_run"]) == ("bfloat16", 5, 2)


def test_a_config_file_overrides_only_the_keys_it_names(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, RUN + ["--dtype", "bfloat16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cell = tmp_path / "cell.toml"
    cell.write_text("death_run = 2\n")
    res = CliRunner().invoke(main, ["run", "--config", str(cell), "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "manifest.json").read_text())["config"]
    assert (cfg["dtype"], cfg["death_run"], cfg["window"]) == ("bfloat16", 2, 8)   # the rest was kept
    assert "reusing the settings saved in" in res.stderr
    assert [line for line in res.stderr.splitlines() if "running" in line] == ["[survival] running ...",
                                                                               "[plot] running ..."]
