import math

import numpy as np
import pandas as pd
import pytest

from isokl_tl.survival import DeathRule, deaths, kaplan_meier, survival_table


def naive_km(time, event):
    """Product-limit by hand: at each distinct event time, S *= 1 - d / (number still at risk),
    where the risk set holds only subjects whose time (death or censoring) is >= t."""
    times = sorted({t for t, e in zip(time, event) if e})
    s, out = 1.0, []
    for t in times:
        at_risk = sum(1 for x in time if x >= t)
        d = sum(1 for x, e in zip(time, event) if x == t and e)
        s *= 1 - d / at_risk
        out.append((t, s))
    return out


@pytest.mark.parametrize("time,event", [
    ([0, 8, 8, 16, 16, 16, 24, 32], [1, 1, 0, 1, 1, 0, 0, 1]),                # ties + censoring
    ([5, 5, 5, 10], [1, 1, 1, 1]),                                             # all dead
    ([3, 7, 9], [0, 0, 0]),                                                    # none dead
    ([0, 0, 4, 4, 4, 12, 12, 20, 20, 20, 28], [1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0]),
])
def test_kaplan_meier_matches_naive_product_limit(time, event):
    time, event = np.array(time, float), np.array(event, bool)
    km = kaplan_meier(time=time, event=event)
    for t, s in naive_km(list(time), list(event)):
        assert km.at(t) == pytest.approx(s, abs=1e-12)
        assert km.at(t - 1e-9) >= km.at(t)
    assert km.n == len(time) and km.died == event.sum() and km.censored == (~event).sum()
    if not event.any():
        assert km.median == math.inf and km.at(100) == 1.0


def test_risk_set_excludes_the_dead():
    # Two die at t=1; at t=2 only the remaining 2 are at risk, so one death halves S (0.5 -> 0.25).
    # A risk set that kept the dead (4 at risk) would give 0.5 * 3/4 = 0.375.
    km = kaplan_meier(time=np.array([1, 1, 2, 3.0]), event=np.array([1, 1, 1, 0], bool))
    assert km.at(1) == pytest.approx(0.5) and km.at(2) == pytest.approx(0.25)


def test_median_and_band():
    km = kaplan_meier(time=np.arange(1, 21, dtype=float), event=np.ones(20, bool))
    assert km.median == 10
    assert km.median_ci[0] <= 10 <= km.median_ci[1]
    assert (km.ci_low <= km.survival + 1e-12).all() and (km.survival <= km.ci_high + 1e-12).all()


def _pmass(rows):
    return pd.DataFrame(rows, columns=["row", "prompt", "alpha", "coeff", "fork", "pmass"])


def test_death_rules():
    pm = _pmass([
        (0, 0, 0.0, 0.0, 0, 0.8), (0, 0, 0.0, 0.0, 8, 0.8), (0, 0, 0.0, 0.0, 16, 0.8),
        (1, 0, 1.0, 5.0, 0, 0.8), (1, 0, 1.0, 5.0, 8, 0.3), (1, 0, 1.0, 5.0, 16, 0.7),
        (2, 0, 2.0, 9.0, 0, 0.8), (2, 0, 2.0, 9.0, 8, 0.3), (2, 0, 2.0, 9.0, 16, 0.2),
    ])
    d = deaths(pm, DeathRule(relative_threshold=0.5)).set_index("row")
    assert (d.loc[0, "event"], d.loc[0, "time"]) == (False, 16)    # censored at its last fork
    assert (d.loc[1, "event"], d.loc[1, "time"]) == (True, 8)      # one reading below 0.4 kills
    assert d.loc[1, "threshold"] == pytest.approx(0.4)
    d2 = deaths(pm, DeathRule(relative_threshold=0.5, death_run=2)).set_index("row")
    assert not d2.loc[1, "event"] and (d2.loc[2, "event"], d2.loc[2, "time"]) == (True, 8)
    d3 = deaths(pm, DeathRule(threshold=0.95, relative_threshold=None))
    assert d3.weak.all()       # base pmass 0.8 < 0.95: the prompt cannot show steering-induced death
    rule = DeathRule(threshold=0.95, relative_threshold=None)
    with pytest.raises(ValueError, match=r"all 1 prompts are weak at absolute threshold 0.95: unsteered "
                                         r"pmass 0.80-0.80 at fork 0; use --relative-threshold or --keep-weak"):
        survival_table(d3, window=16, rule=rule)
    st = survival_table(d3, window=16, keep_weak=True)
    assert list(st.table.alpha) == [0.0, 1.0, 2.0] and st.table.died.sum() == 3
    assert set(st.curves) == {0.0, 1.0, 2.0} and st.weak_prompts == [0]


def test_a_prompt_whose_unsteered_rollout_dies_later_is_weak():
    """The baseline check reads every fork: a prompt whose alpha-0 rollout falls below the
    threshold after fork 0 (and dies by the rule) cannot show a steering-induced death."""
    pm = _pmass([
        # prompt 0: unsteered stays up; steered dies at 8
        (0, 0, 0.0, 0.0, 0, 0.8), (0, 0, 0.0, 0.0, 8, 0.8), (0, 0, 0.0, 0.0, 16, 0.8),
        (1, 0, 1.0, 5.0, 0, 0.8), (1, 0, 1.0, 5.0, 8, 0.3), (1, 0, 1.0, 5.0, 16, 0.2),
        # prompt 1: the unsteered rollout itself drops below half its fork-0 pmass at 16
        (2, 1, 0.0, 0.0, 0, 0.8), (2, 1, 0.0, 0.0, 8, 0.7), (2, 1, 0.0, 0.0, 16, 0.3),
        (3, 1, 1.0, 5.0, 0, 0.8), (3, 1, 1.0, 5.0, 8, 0.2), (3, 1, 1.0, 5.0, 16, 0.2),
    ])
    d = deaths(pm, DeathRule(relative_threshold=0.5)).set_index("row")
    assert not d.loc[[0, 1], "weak"].any() and d.loc[[2, 3], "weak"].all()
    assert d.loc[[0, 1], "base_death"].isna().all() and (d.loc[[2, 3], "base_death"] == 16).all()
    st = survival_table(d.reset_index(), window=16)
    assert st.weak_prompts == [1] and list(st.table.n) == [1, 1] and list(st.table.died) == [0, 1]
    from isokl_tl.summary import weak_text
    assert weak_text(st) == "1 (unsteered pmass 0.80 at fork 0; its unsteered rollout's pmass dies at token 16)"
    later = survival_table(deaths(pm, DeathRule(threshold=0.75, relative_threshold=None)), window=16)
    assert weak_text(later) == "1 (unsteered pmass 0.80 at fork 0; its unsteered rollout's pmass dies at token 8)"
    low = survival_table(deaths(pm, DeathRule(threshold=0.85, relative_threshold=None)), window=16, keep_weak=True)
    assert weak_text(low) == "0 (unsteered pmass 0.80 at fork 0), 1 (unsteered pmass 0.80 at fork 0)"
    # a dip the rule forgives (one fork below, death run 2) leaves the prompt in
    d2 = deaths(pm, DeathRule(relative_threshold=0.5, death_run=2)).set_index("row")
    assert not d2.weak.any() and d2.base_death.isna().all()
    only_dying = pm[pm.prompt == 1]
    with pytest.raises(ValueError, match="1 of the 1 unsteered rollouts die by the rule later themselves"):
        survival_table(deaths(only_dying, DeathRule(relative_threshold=0.5)), window=16, rule=DeathRule())


@pytest.mark.parametrize("kw,msg", [
    (dict(threshold=1.5, relative_threshold=None), "threshold must be in \\(0, 1\\), got 1.5"),
    (dict(threshold=0.5, relative_threshold=0.5), "exactly one"),
    (dict(death_run=0), "death-run must be >= 1"),
])
def test_bad_rules(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DeathRule(**kw)


def test_threshold_sweep_agrees_with_the_survival_table_at_each_rule():
    """Each row of the sweep is the survival table that rule gives (same deaths, same KM), and
    the markdown and figure are drawn from it."""
    from isokl_tl.plots import plot_threshold_sweep
    from isokl_tl.survival import sweep_markdown, threshold_sweep

    rng = np.random.default_rng(0)
    rows = []
    for prompt in range(6):
        for k, alpha in enumerate((0.0, 1.0, 2.0)):
            row = prompt * 3 + k
            for fork in (0, 8, 16, 24):
                rows.append((row, prompt, alpha, alpha * 10, fork, float(np.clip(0.85 - alpha * fork / 60
                                                                                   + rng.normal(0, 0.05), 0, 1))))
    pm = _pmass(rows)
    sweep = threshold_sweep(pm, 24, absolute=(0.5, 0.99), relative=(0.25, 0.5), death_runs=(1, 2))
    assert len(sweep) == (2 + 2) * 2 * 3
    for kind, value, run in [("relative", 0.5, 1), ("relative", 0.25, 2), ("absolute", 0.5, 2)]:
        rule = DeathRule(threshold=value if kind == "absolute" else None,
                         relative_threshold=value if kind == "relative" else None, death_run=run)
        table = survival_table(deaths(pm, rule), 24, rule=rule).table.set_index("alpha")
        got = sweep[(sweep.rule == kind) & (sweep.threshold == value) & (sweep.death_run == run)].set_index("alpha")
        assert list(got.n) == list(table.n) and list(got.died) == list(table.died)
        np.testing.assert_allclose(got.S_end, table.S_end)
        np.testing.assert_array_equal(got["median"], table["median"])
    assert sweep[sweep.rule == "relative"].died.sum() > 0          # the synthetic doses kill
    assert (sweep[sweep.threshold == 0.99].n == 0).all()           # every prompt weak at 0.99
    text = sweep_markdown(sweep)
    assert "| pmass < 0.99 | 1 | 0 | no prompt | no prompt | no prompt |" in text
    assert len(plot_threshold_sweep(sweep)) == 2


def test_calibration_transfer_recomputes_the_statistic_on_held_out_rollouts():
    import torch

    from isokl_tl.calibrate import Calibration
    from isokl_tl.transfer import transfer, transfer_line
    from isokl_tl.rollout import Rollouts
    from isokl_tl.search import kl_statistic

    g = torch.Generator().manual_seed(0)
    n, w = 6, 20
    kl = torch.rand(2 * n, w, generator=g) * torch.linspace(0.5, 2.0, w)
    gen_len = torch.tensor([w] * (2 * n - 1) + [5])
    kl[-1, 5:] = float("nan")

    rows = 2 * n
    R = Rollouts(prompt=torch.ones(rows, 3, dtype=torch.long), prompt_mask=torch.ones(rows, 3, dtype=torch.long),
                 tokens=torch.ones(rows, w, dtype=torch.long), kl=kl, logprob=torch.zeros(rows, w),
                 base_agree=torch.ones(rows, w, dtype=torch.bool), base_logprob=torch.zeros(rows, w), gen_len=gen_len, eos=gen_len < w,
                 coeff=torch.zeros(rows), prompt_index=torch.arange(rows) % n,
                 alpha=torch.tensor([0.0] * n + [1.0] * n))
    cal = Calibration(c_star=3.0, converged=True, statistic="quantile", quantile=0.95, target=1.0, window=8,
                      n_tokens=0, rounds=1, history=[])
    t = transfer(R, cal, bootstrap=200)
    first = [kl[i, :8][R.mask[i, :8]].numpy() for i in range(n, 2 * n)]
    whole = [kl[i][R.mask[i]].numpy() for i in range(n, 2 * n)]
    assert t["calibration_window"]["value"] == pytest.approx(kl_statistic(first, "quantile", 0.95))
    assert t["whole_window"]["value"] == pytest.approx(kl_statistic(whole, "quantile", 0.95))
    assert t["whole_window"]["n_tokens"] == (n - 1) * w + 5 and t["n_prompts"] == n
    lo, hi = t["whole_window"]["interval"]
    assert lo <= t["whole_window"]["value"] <= hi and lo < hi
    assert t["whole_window"]["value"] > t["calibration_window"]["value"]   # KL grows along these rollouts
    assert "against the 1-nat target" in transfer_line(t) and "the whole 20-token window" in transfer_line(t)
    with pytest.raises(ValueError, match="no rows at alpha 4"):
        transfer(R, cal, alpha=4.0)


def test_heldout_kl_and_the_dose_response_by_signal():
    import torch

    from isokl_tl.calibrate import Calibration
    from isokl_tl.transfer import heldout_kl
    from isokl_tl.coherence import deaths_by_signal
    from isokl_tl.plots import plot_dose_response
    from isokl_tl.rollout import Rollouts
    from isokl_tl.search import kl_statistic

    g = torch.Generator().manual_seed(1)
    n, w = 4, 24
    alpha = torch.tensor([0.0] * n + [1.0] * n + [2.0] * n)
    kl = torch.rand(3 * n, w, generator=g) * alpha[:, None]
    rows = 3 * n
    r = Rollouts(prompt=torch.ones(rows, 3, dtype=torch.long), prompt_mask=torch.ones(rows, 3, dtype=torch.long),
                 tokens=torch.ones(rows, w, dtype=torch.long), kl=kl, logprob=torch.zeros(rows, w),
                 base_agree=torch.ones(rows, w, dtype=torch.bool), base_logprob=torch.zeros(rows, w), gen_len=torch.full((rows,), w),
                 eos=torch.zeros(rows, dtype=torch.bool), coeff=alpha * 3, prompt_index=torch.arange(rows) % n,
                 alpha=alpha)
    cal = Calibration(c_star=3.0, converged=True, statistic="quantile", quantile=0.9, target=1.0, window=8,
                      n_tokens=0, rounds=1, history=[])
    k = heldout_kl(r, cal, bootstrap=50).set_index("alpha")
    assert list(k.index) == [1.0, 2.0]                      # alpha 0: KL 0, no panel point
    assert k.loc[2.0, "value"] == pytest.approx(kl_statistic([kl[i].numpy() for i in range(2 * n, 3 * n)],
                                                             "quantile", 0.9))
    assert (k.lo <= k.value).all() and (k.value <= k.hi).all()
    pm = pd.DataFrame({"row": range(rows), "prompt": [i % n for i in range(rows)], "alpha": alpha.tolist(),
                       "coeff": 0.0, "time": 16, "event": [False] * n + [True] * (2 * n), "threshold": 0.3,
                       "base_pmass0": 0.7, "weak": False})
    signals = pd.DataFrame({"row": np.repeat(range(rows), w), "t": np.tile(np.arange(1, w + 1), rows),
                            "repetition": 0.0, "compression": 1.0})
    by_signal = deaths_by_signal(signals, pm, {"repetition": 0.9, "compression": 2.5},
                                 text_signals=("repetition", "compression"))
    table = survival_table(pm, w)
    axes = plot_dose_response(table, by_signal=by_signal, kl=k.reset_index())
    assert len(axes) == 3 and len(axes[0].get_legend().get_texts()) == 4
    assert len(plot_dose_response(table)) == 2


def _cases():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 12, 40, 200):
        for censored in (0.0, 0.3, 1.0):
            time = rng.integers(0, 12, n).astype(float) * 8          # fork times: many ties
            yield time, rng.random(n) >= censored
    yield np.array([0.0, 0.0, 8.0]), np.array([True, True, True])   # everyone dead, some at 0
    yield np.array([4.0, 4.0, 9.5, 20.0]), np.array([True, False, True, False])


@pytest.mark.parametrize("time,event", list(_cases()))
def test_kaplan_meier_equals_scikit_survival(time, event):
    """Our estimate and band against an independent implementation (scikit-survival, in the dev
    extra only)."""
    kaplan_meier_estimator = pytest.importorskip("sksurv.nonparametric").kaplan_meier_estimator
    km = kaplan_meier(time=time, event=event)
    t, s, (lo, hi) = kaplan_meier_estimator(event, time, conf_type="log-log")
    np.testing.assert_array_equal(km.time, t)
    np.testing.assert_allclose(km.survival, s, rtol=0, atol=1e-14)
    np.testing.assert_allclose(km.ci_low, np.nan_to_num(lo, nan=0.0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(km.ci_high, np.nan_to_num(hi, nan=1.0), rtol=0, atol=1e-12)


def test_kaplan_meier_refuses_times_that_are_not_numbers():
    with pytest.raises(ValueError, match="finite"):
        kaplan_meier(time=np.array([1.0, np.nan, 3.0]), event=np.array([True, False, True]))
