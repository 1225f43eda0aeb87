"""`RunConfig` and the command line agree: every setting keys a stage or is an execution setting,
and every default the CLI's help shows is `RunConfig`'s."""

import re
from dataclasses import fields

import click
import pytest
from isokl_tl_cli.main import main

from isokl_tl.config import STAGES, RunConfig


def test_every_setting_keys_a_stage_or_is_an_execution_setting():
    keyed = {k for keys in RunConfig._STAGE_KEYS.values() for k in keys}
    names = {f.name for f in fields(RunConfig)}
    assert set(RunConfig._STAGE_KEYS) == set(STAGES)
    assert not keyed & set(RunConfig.EXECUTION)
    assert names == keyed | set(RunConfig.EXECUTION), sorted(names ^ (keyed | set(RunConfig.EXECUTION)))


@pytest.mark.parametrize("command", ["run", "calibrate", "direction", "rollout", "pmass", "survival"])
def test_the_defaults_shown_in_help_are_run_config_defaults(command):
    defaults, seen = RunConfig().to_dict(), 0
    flags = {"generated_only": {False: "all-positions", True: "generated-only"},
             "record_acts": {False: "no-record-acts", True: "record-acts"},
             "keep_weak": {False: "drop-weak", True: "keep-weak"},
             "gate": {False: "no-gate", True: "gate"},
             "inline_forks": {False: "forks-after-sweep", True: "inline-forks"},
             "resample_pairs": {False: "no-resample-pairs", True: "resample-pairs"}}
    for p in main.commands[command].params:
        m = re.search(r"\[default: (.*)\]\.?$", p.help or "") if isinstance(p, click.Option) else None
        if not m or p.name not in defaults or defaults[p.name] is None:   # None: a rule, e.g. the hook
            continue
        shown, value = m.group(1), defaults[p.name]
        if p.name in flags:
            assert shown == flags[p.name][value], p.name
        elif p.name == "alphas":
            assert [float(a) for a in shown.split()] == value
        elif p.name == "splice_prefill":
            assert shown == '{"choice": '
        else:
            assert shown == str(value), (p.name, shown, value)
        seen += 1
    assert seen >= 2


def test_settings_added_later_key_a_stage_only_when_set(tmp_path):
    """Run directories made before the external-direction, gate and death-signal settings existed
    stay current: those settings enter a stage's key only when they differ from the values those
    runs used."""
    import numpy as np

    from isokl_tl.coherence import SIGNALS_VERSION
    from isokl_tl.survival import BASELINE_CHECK_VERSION
    from isokl_tl.config import RunConfig
    from isokl_tl.manifest import settings_hash

    later = set(RunConfig._LATER_KEYS)
    for stage in ("direction", "calibrate", "rollout", "pmass"):
        assert not later & set(RunConfig().stage_settings(stage))
    # the values older runs used stay out of the key; a default that has changed since is not theirs
    older = RunConfig(repetition_threshold=0.9, compression_threshold=2.5).stage_settings("plot")
    assert not later & set(older)
    today = RunConfig().stage_settings("plot")
    assert (today["repetition_threshold"], today["compression_threshold"]) == (1.0, 3.0)
    # survival is keyed on the signals' definitions: runs read under older ones read them again
    assert older["coherence_signals"] == SIGNALS_VERSION and "coherence_signals" not in RunConfig().stage_settings("pmass")
    assert older["baseline_check"] == BASELINE_CHECK_VERSION and "baseline_check" not in RunConfig().stage_settings("pmass")
    np.save(tmp_path / "v.npy", np.ones(4))
    given = RunConfig(direction_file=str(tmp_path / "v.npy")).stage_settings("plot")
    assert given["direction_file"] == str(tmp_path / "v.npy")       # (its content: `Run.current` compares hashes)
    assert settings_hash(given) != settings_hash(RunConfig().stage_settings("plot"))


def test_the_splice_close_keys_pmass_as_older_runs_did_and_inline_splices_by_their_definition():
    """An interrupt splice is keyed as before the close's default became None (""), so older runs
    stay current; inline splices carry the definition's version, and the close as given: the
    model's default (None) is not "no close" ("")."""
    from isokl_tl.config import RunConfig
    from isokl_tl.manifest import settings_hash

    interrupt = RunConfig().stage_settings("pmass")
    assert interrupt["splice_close"] == "" and "inline_splice" not in interrupt
    default, off = (RunConfig(splice="inline", splice_close=c).stage_settings("pmass") for c in (None, ""))
    assert default["inline_splice"] == RunConfig.INLINE_SPLICE_VERSION == 2
    assert settings_hash(default) != settings_hash(off)
    assert "inline_splice" in RunConfig(splice="inline").stage_settings("plot")       # downstream follows
    with pytest.raises(ValueError, match="inline splice only"):
        RunConfig(splice_close="</think>")


def test_a_direction_file_and_an_sae_replace_each_other():
    from isokl_tl.config import RunConfig, settle

    saved = RunConfig(sae="sae_dir", feature=3).to_dict()
    switched = RunConfig.from_dict({**saved, **settle({"direction_file": "v.npy"})})
    assert (switched.direction_file, switched.sae, switched.feature) == ("v.npy", None, None)
    back = RunConfig.from_dict({**switched.to_dict(), **settle({"sae": "other", "feature": 1})})
    assert (back.direction_file, back.sae, back.feature) == (None, "other", 1)


@pytest.mark.parametrize("sign", ["positive", "negative", "both"])
def test_a_negative_alpha_is_refused_whatever_the_sign(sign):
    """An alpha is a multiple of c*; -v's dose needs -v's own c* (`--sign`), never +v's negated."""
    with pytest.raises(ValueError, match=r"must be >= 0 \(got -1.0\).*--sign negative or --sign both"):
        RunConfig(alphas=(-1.0, 0.0, 1.0), sign=sign)
    assert RunConfig(alphas=(0.0, 1.0), sign=sign).sweep_alphas() == {
        "positive": [0.0, 1.0], "negative": [-1.0, 0.0], "both": [-1.0, 0.0, 1.0]}[sign]
    assert "-0" not in [f"{a:g}" for a in RunConfig(alphas=(0.0, 1.0), sign=sign).sweep_alphas()]   # no "alpha -0" row


def test_a_nan_alpha_is_refused_and_a_sign_without_its_own_calibration_has_no_c_star():
    with pytest.raises(ValueError, match=r"must be >= 0 \(got nan\)"):
        RunConfig(alphas=(float("nan"), 1.0))
    from isokl_tl.calibrate import Calibration, c_star_for

    def cal(c_star, sign):
        return Calibration(c_star=c_star, converged=True, statistic="quantile", quantile=0.95, target=1.0,
                           window=8, n_tokens=8, rounds=1, history=[], sign=sign)
    plus, minus = cal(10.0, 1), cal(7.0, -1)
    assert c_star_for(-1.0, {1: plus, -1: minus}) == 7.0 and c_star_for(2.0, {1: plus, -1: minus}) == 10.0
    assert c_star_for(0.0, {-1: minus}) == 7.0
    with pytest.raises(ValueError, match="alpha -1 steers along -v, which this run did not calibrate"):
        c_star_for(-1.0, {1: plus})
    with pytest.raises(ValueError, match=r"alpha 1 steers along \+v"):
        c_star_for(1.0, {-1: minus})


def test_a_run_directory_saved_under_settings_now_refused_says_so_and_yields_to_force(tmp_path):
    from isokl_tl.manifest import Manifest
    from isokl_tl.run import Run

    saved = {**RunConfig(model="tiny-random").to_dict(), "alphas": [-1.0, 0.0, 1.0]}   # +v's c* negated, once
    m = Manifest(tmp_path / "old")
    m.set(config=saved)
    m.save()
    with pytest.raises(ValueError, match=r"made with settings this version refuses \(alphas are multiples of c\*"
                                         r".*pass --force to overwrite it"):
        Run(tmp_path / "old", RunConfig(model="tiny-random"), progress=False, log=lambda m: None)
    run = Run(tmp_path / "old", RunConfig(model="tiny-random"), progress=False, log=lambda m: None, force=True)
    assert run.manifest.data == {"stages": {}}
