import numpy as np
import pytest
import torch

from isokl_tl.calibrate import CalibrationError, CalibrationSettings, calibrate, kl_statistic
from isokl_tl.directions import compute_direction
from isokl_tl.prompts import load_pairs, load_prompts
from isokl_tl.rollout import rollout
from isokl_tl.tokens import prompt_ids


def _prompts(model, n):
    return [prompt_ids(model.tokenizer, p) for p in load_prompts("calibration")[:n]]


def _restat(model, d, prompts, cal, coeff=None):
    """The calibration statistic recomputed by a fresh rollout at `coeff` (default c*)."""
    c = cal.c_star if coeff is None else coeff
    r = rollout(model, prompts, torch.full((len(prompts),), c), direction=d.vector,
                hook=d.hook, method=d.intervention, window=cal.window)
    kl, m = r.kl.numpy(), r.mask.numpy()
    return kl_statistic([kl[i][m[i]] for i in range(len(prompts))], cal.statistic, cal.quantile)


@pytest.mark.parametrize("method", ["mean_diff", "directional_ablation"])
def test_converges_on_tiny_and_statistic_holds_at_c_star(tiny, method):
    d = compute_direction(tiny, load_pairs()[:8], "blocks.2.hook_resid_post", method)
    prompts = _prompts(tiny, 8)
    s = CalibrationSettings(window=16, bootstrap=50)
    cal = calibrate(tiny, d, prompts, s)
    assert cal.converged and abs(cal.value / s.target - 1) <= s.tol
    assert abs(_restat(tiny, d, prompts, cal) / s.target - 1) <= s.tol
    assert [h["coeff"] for h in cal.history][0] > 0 and len(cal.history) >= cal.rounds
    assert set(cal.history[0]) == {"coeff", "value", "n_tokens", "seconds"}
    assert cal.interval is None or cal.interval[0] <= cal.c_star <= cal.interval[1]


@pytest.mark.parametrize("statistic", ["mean", "max", "prompt_quantile"])
def test_other_statistics(tiny, tiny_direction, statistic):
    cal = calibrate(tiny, tiny_direction, _prompts(tiny, 3),
                    CalibrationSettings(window=12, statistic=statistic, target=0.5, bootstrap=0))
    assert cal.statistic == statistic and cal.converged and cal.interval is None


def test_unreachable_target_raises_with_history(tiny, tiny_direction):
    with pytest.raises(CalibrationError, match=r"(saturates|not reached).*history: c=") as e:
        calibrate(tiny, tiny_direction, _prompts(tiny, 2), CalibrationSettings(window=8, target=500.0))
    assert str(e.value).count("c=") >= 3


def test_kl_statistic():
    rows = [np.array([0.0, 1.0, 2.0]), np.array([3.0])]
    assert kl_statistic(rows, "mean", 0.95) == pytest.approx(1.5)
    assert kl_statistic(rows, "max", 0.95) == 3.0
    assert kl_statistic(rows, "quantile", 0.5) == pytest.approx(1.5)
    assert kl_statistic(rows, "prompt_quantile", 0.5) == pytest.approx((1.0 + 3.0) / 2)


@pytest.mark.parametrize("kw,msg", [(dict(quantile=1.5), "quantile must be in"),
                                    (dict(window=0), "window must be a positive"),
                                    (dict(target=-1.0), "target KL must be > 0"),
                                    (dict(statistic="median"), "statistic 'median'")])
def test_bad_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CalibrationSettings(**kw)


@pytest.mark.slow
def test_converges_on_the_embedded_model(smol):
    d = compute_direction(smol, load_pairs(), "blocks.18.hook_resid_post", "mean_diff")
    prompts = _prompts(smol, 4)
    cal = calibrate(smol, d, prompts, CalibrationSettings(window=12, bootstrap=0))
    assert cal.converged
    assert abs(_restat(smol, d, prompts, cal) - 1.0) <= 0.02


def test_a_jump_in_the_statistic_is_reported_not_hidden(tiny):
    """With few tokens the quantile jumps where a greedy token flips; calibration must then say
    converged=False and show the jump rather than pretend."""
    d = compute_direction(tiny, load_pairs()[:8], "blocks.2.hook_resid_post", "directional_ablation")
    prompts = _prompts(tiny, 4)
    cal = calibrate(tiny, d, prompts, CalibrationSettings(window=16, bootstrap=0))
    assert not cal.converged                  # this seeded case jumps across the target
    j = cal.extra["jump"]
    assert j["value_lo"] < 0.98 and j["value_hi"] > 1.02 and j["c_hi"] / j["c_lo"] - 1 < 1e-3
    # the jump is real: fresh rollouts on either side of it give the recorded statistics
    assert _restat(tiny, d, prompts, cal, j["c_lo"]) == pytest.approx(j["value_lo"], rel=1e-5)
    assert _restat(tiny, d, prompts, cal, j["c_hi"]) == pytest.approx(j["value_hi"], rel=1e-5)
    assert cal.c_star in (j["c_lo"], j["c_hi"])


def test_lockstep_calibration_equals_separate_searches(tiny):
    from isokl_tl.calibrate import calibrate_many
    from isokl_tl.directions import compute_direction
    from isokl_tl.prompts import load_pairs

    pairs = load_pairs()[:8]
    dirs = [compute_direction(tiny, pairs, "blocks.1.hook_resid_post", "mean_diff"),
            compute_direction(tiny, pairs, "blocks.2.hook_resid_post", "directional_ablation"),
            compute_direction(tiny, pairs, "blocks.3.hook_resid_post", "pca")]
    prompts = _prompts(tiny, 3)
    s = CalibrationSettings(window=12, bootstrap=0)
    together = calibrate_many(tiny, dirs, prompts, s, rows_per_batch=8)
    for d, cal in zip(dirs, together):
        alone = calibrate(tiny, d, prompts, s)
        assert cal.hook == d.hook and cal.method == d.method
        assert [h["coeff"] for h in cal.history] == pytest.approx([h["coeff"] for h in alone.history], rel=1e-4)
        assert cal.c_star == pytest.approx(alone.c_star, rel=1e-4) and cal.rounds == alone.rounds


def _drive(statistic, settings):
    """Run the search's generator against a statistic of the coefficient alone."""
    from isokl_tl.directions import Direction
    from isokl_tl.search import Search, _Eval, steps

    d = Direction(torch.ones(4) / 2, "mean_diff", "blocks.0.hook_resid_post", 1.0, 1.0, 10.0, 2, "none")
    search = Search(d, settings)
    gen = steps(search)
    coeffs = next(gen)
    try:
        while True:
            search.evals += [_Eval(c, statistic(c), 1, 0.0, []) for c in coeffs]
            coeffs = gen.send(None)
    except StopIteration as stop:
        return search, stop.value


@pytest.mark.parametrize("rounds", [1, 2])
def test_running_out_of_rounds_before_bracketing_raises(rounds):
    """A search stopped by max_rounds while the target is still on one side of every coefficient
    tried raises with its history; it never returns the closest guess."""
    with pytest.raises(CalibrationError, match=f"not bracketed in {rounds} rounds.*history"):
        _drive(lambda c: 1e-4 * c, CalibrationSettings(max_rounds=rounds, bootstrap=0))
    search, (n, _) = _drive(lambda c: (c / 3.0) ** 2, CalibrationSettings(bootstrap=0))   # bracketed: converges
    assert abs(search.best().coeff / 3.0 - 1) < 0.02 and n < 14


@pytest.mark.parametrize("statistic,root", [
    (lambda c: 1e-5 * c * c - 1e-3 * c, 370.2),          # negative at small c, then rising (delta_ce can)
    (lambda c: 0.0 if c < 37 else ((c - 30) / 10) ** 2, 40.0),   # exactly zero below a threshold
])
def test_a_statistic_not_yet_positive_is_climbed_past_not_called_saturated(statistic, root):
    """Saturation is judged on positive values: a statistic that falls while negative (or stays at
    zero) at small coefficients is searched upward until it brackets the target."""
    search, _ = _drive(statistic, CalibrationSettings(bootstrap=0))
    assert abs(statistic(search.best().coeff) - 1.0) <= 0.02
    assert search.best().coeff == pytest.approx(root, rel=0.05)


def test_a_positive_statistic_that_stops_growing_is_saturated():
    with pytest.raises(CalibrationError, match="saturates below the target"):
        _drive(lambda c: 0.5 * c / (c + 1e-3), CalibrationSettings(bootstrap=0))


def test_the_c_star_interval_counts_resamples_that_do_not_bracket_the_target():
    """A resample whose statistic stays below the target up to the largest coefficient has its c*
    beyond it: it is counted there, not dropped (which would narrow the interval). Here about 1 in 4
    resamples draws only the prompt whose KL never reaches the target: the upper 95% end lies
    beyond the evaluated coefficients, so there is no interval; without that prompt there is one.
    Likewise at the lower end for a prompt above the target everywhere."""
    from isokl_tl.calibrate import bootstrap_interval
    from isokl_tl.search import _Eval

    def evals(per_prompt):
        return [_Eval(c, 0.0, 2, 0.0, [np.array([v]) for v in kl]) for c, kl in per_prompt.items()]

    s = CalibrationSettings(statistic="mean", bootstrap=400)
    never = {1.0: [0.5, 0.5], 2.0: [0.8, 1.2], 4.0: [0.95, 3.0]}          # prompt 0 stays below 1 nat
    assert bootstrap_interval(evals(never), s, 2) is None
    always = {1.0: [0.5, 1.5], 2.0: [1.2, 2.0], 4.0: [3.0, 4.0]}           # prompt 1 is above it everywhere
    assert bootstrap_interval(evals(always), s, 2) is None
    both = {1.0: [0.5, 0.6], 2.0: [0.9, 1.2], 4.0: [3.0, 3.5]}             # both cross it between 1 and 4
    lo, hi = bootstrap_interval(evals(both), s, 2)
    assert 1.0 <= lo <= hi <= 4.0
