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
                                         r"pmass 0.80-0.80; use --relative-threshold or --keep-weak"):
        survival_table(d3, window=16, rule=rule)
    st = survival_table(d3, window=16, keep_weak=True)
    assert list(st.table.alpha) == [0.0, 1.0, 2.0] and st.table.died.sum() == 3
    assert set(st.curves) == {0.0, 1.0, 2.0} and st.weak_prompts == [0]


@pytest.mark.parametrize("kw,msg", [
    (dict(threshold=1.5, relative_threshold=None), "threshold must be in \\(0, 1\\), got 1.5"),
    (dict(threshold=0.5, relative_threshold=0.5), "exactly one"),
    (dict(death_run=0), "death-run must be >= 1"),
])
def test_bad_rules(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DeathRule(**kw)
