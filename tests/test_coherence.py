"""Coherence signals (repetition, compression), deaths by signal and which signal kills first."""

import numpy as np
import pandas as pd
import pytest

from isokl_tl.coherence import (
    compression,
    deaths_by_signal,
    first_signal,
    repetition,
    signal_frame,
    signal_table,
    signals_markdown,
    surprisal,
)


def test_repetition_counts_tokens_that_end_an_ngram_seen_before():
    fresh = list(range(40))
    loop = list(range(10)) * 4
    assert np.isnan(repetition(fresh)[:31]).all() and (repetition(fresh)[31:] == 0).all()     # the defaults
    assert np.isnan(repetition(fresh, n=4, k=16)[:15]).all()
    r = repetition(loop, n=4, k=16)
    # the loop's 4-grams come back from its 14th token on (the second lap's 4th): by token 30 all 16 repeat
    assert r[29] == 1.0 and r[15] == pytest.approx(3 / 16)
    assert len(repetition([1, 2, 3])) == 3 and np.isnan(repetition([1, 2, 3])).all()


def test_compression_separates_a_loop_from_prose():
    prose = ("The Sun is a star because it is a huge ball of hot gas that makes its own light by fusing "
             "hydrogen into helium deep inside its core, which is why we see it shine during the day while "
             "other stars appear only at night, far smaller").split(" ")
    looped = ["The Earth is round"] * 32
    assert compression([w + " " for w in prose])[-1] < 1.5 < 3.0 < compression(looped)[-1]
    assert np.isnan(compression(["a"] * 31)).all()


def test_surprisal_is_the_trailing_mean_of_minus_the_base_log_probability():
    lp = -np.arange(20, dtype=float)            # -log p = 0, 1, ..., 19
    s = surprisal(lp, k=4)
    assert np.isnan(s[:3]).all() and s[3] == pytest.approx(1.5) and s[-1] == pytest.approx(17.5)
    assert np.isnan(surprisal(np.full(20, np.nan), k=4)).all()      # not recorded: no signal


def _pmass_deaths():
    return pd.DataFrame({"row": [0, 1, 2], "prompt": [0, 0, 1], "alpha": [0.0, 2.0, 2.0], "coeff": [0.0, 5.0, 5.0],
                         "time": [32, 16, 32], "event": [False, True, False], "threshold": 0.3,
                         "base_pmass0": 0.7, "weak": False})


def test_deaths_by_signal_and_first_signal():
    t = np.arange(1, 41)
    signals = pd.concat([
        pd.DataFrame({"row": 0, "t": t, "repetition": 0.1, "compression": 1.2}),
        pd.DataFrame({"row": 1, "t": t, "repetition": np.where(t >= 20, 0.9, 0.1), "compression": 1.2}),
        pd.DataFrame({"row": 2, "t": t, "repetition": np.where(t >= 25, 0.9, 0.1),
                      "compression": np.where(t >= 12, 4.0, 1.2)}),
    ])
    thresholds = {"repetition": 0.75, "compression": 2.5}
    by = deaths_by_signal(signals, _pmass_deaths(), thresholds, text_signals=("repetition", "compression")
                          ).set_index(["row", "signal"])
    assert (by.loc[(0, "repetition"), "event"], by.loc[(0, "repetition"), "time"]) == (False, 40)   # censored at its end
    assert (by.loc[(1, "repetition"), "time"], by.loc[(1, "pmass"), "time"]) == (20, 16)
    assert (by.loc[(1, "any"), "time"], by.loc[(2, "any"), "time"]) == (16, 12)
    assert not by.loc[(0, "any"), "event"]
    first = first_signal(by.reset_index())
    assert first.set_index("alpha").loc[0.0, "none"] == 1
    assert tuple(first.set_index("alpha").loc[2.0, ["first_pmass", "first_compression"]]) == (1, 1)
    table = signal_table(by.reset_index(), 40)
    assert list(table.signal.unique()) == ["pmass", "repetition", "compression", "any"]   # no surprisal recorded
    assert table.set_index(["signal", "alpha"]).loc[("any", 2.0), "died"] == 2
    text = signals_markdown(table, first, {"repetition": 0.75, "compression": 2.5})
    assert "| repetition >= 0.75 | 1.00 / not reached | 0.00 / 20 |" in text
    assert "| alpha | pmass | repetition | compression | none |" in text


def test_surprisal_and_flip_deaths_join_the_other_signals():
    t = np.arange(1, 41)
    signals = pd.concat([
        pd.DataFrame({"row": 0, "t": t, "repetition": 0.1, "compression": 1.2, "surprisal": 1.0}),
        pd.DataFrame({"row": 1, "t": t, "repetition": 0.1, "compression": 1.2, "surprisal": np.where(t >= 9, 6.0, 1.0)}),
        pd.DataFrame({"row": 2, "t": t, "repetition": 0.1, "compression": 1.2, "surprisal": 1.0}),
    ])
    flips = pd.DataFrame({"row": [0, 1], "prompt": [0, 0], "alpha": [0.0, 2.0], "time": [32, 8],
                          "event": [False, True]})
    thresholds = {"repetition": 0.75, "compression": 2.5, "surprisal": 4.0}
    by = deaths_by_signal(signals, _pmass_deaths(), thresholds, flips).set_index(["row", "signal"])
    assert (by.loc[(1, "surprisal"), "time"], by.loc[(1, "flip"), "time"], by.loc[(1, "any"), "time"]) == (9, 8, 8)
    assert (2, "flip") not in by.index and not by.loc[(0, "surprisal"), "event"]
    first = first_signal(by.reset_index()).set_index("alpha")
    assert first.loc[2.0, "first_flip"] == 1 and first.loc[2.0, "first_surprisal"] == 0
    text = signals_markdown(signal_table(by.reset_index(), 40), first.reset_index(), thresholds)
    assert "| surprisal >= 4 |" in text and "| answer flipped (rollouts right unsteered) | 1.00 / not reached | 0.00 / 8 |" in text


def test_signal_frame_reads_each_rollout_up_to_its_length():
    tokens = np.array([[1, 2, 3, 4] * 10, [5, 6, 7, 8] * 10])
    frame = signal_frame(tokens, np.array([40, 36]), lambda ids: f"<{ids[0]}>")
    assert list(frame.groupby("row").t.max()) == [40, 36]
    assert frame[frame.row == 0].repetition.iloc[-1] == pytest.approx(29 / 32)    # 8-grams repeat from the 12th token


def _deaths_by_signal_loop(signals, pmass_deaths, thresholds, flips, text_signals):
    """The reference: one rollout and one signal at a time, as written before it was vectorised."""
    out = [{"row": d.row, "prompt": d.prompt, "alpha": d.alpha, "weak": d.weak, "signal": "pmass",
            "time": d.time, "event": d.event} for d in pmass_deaths.itertuples()]
    by_row = dict(tuple(signals.groupby("row")))
    for d in pmass_deaths.itertuples():
        s = by_row.get(d.row)
        last = int(s.t.max()) if s is not None and len(s) else int(d.time)
        for name in text_signals:
            hit = s[s[name] >= thresholds[name]].t if s is not None else pd.Series([], dtype=int)
            out.append({"row": d.row, "prompt": d.prompt, "alpha": d.alpha, "weak": d.weak, "signal": name,
                        "time": int(hit.iloc[0]) if len(hit) else last, "event": bool(len(hit))})
    weak = pmass_deaths.set_index("row").weak
    for d in flips.itertuples():
        out.append({"row": d.row, "prompt": d.prompt, "alpha": d.alpha, "weak": bool(weak.get(d.row, False)),
                    "signal": "flip", "time": int(d.time), "event": bool(d.event)})
    frame = pd.DataFrame(out)
    first = []
    for row, g in frame.groupby("row", sort=True):
        dead = g[g.event]
        pick = dead.loc[dead.time.idxmin()] if len(dead) else g.loc[g.time.idxmin()]
        first.append({**{k: pick[k] for k in ("row", "prompt", "alpha", "weak")}, "signal": "any",
                      "time": int(pick.time), "event": bool(len(dead))})
    return pd.concat([frame, pd.DataFrame(first)], ignore_index=True)


@pytest.mark.parametrize("seed", range(6))
def test_deaths_by_signal_equals_the_loop_it_replaced(seed):
    rng = np.random.default_rng(seed)
    n = 12
    pm = pd.DataFrame({"row": np.arange(n), "prompt": np.arange(n) % 3, "alpha": (np.arange(n) // 3) * 0.5,
                       "weak": rng.random(n) < 0.2, "time": rng.integers(0, 5, n) * 8,
                       "event": rng.random(n) < 0.5})
    rows = []
    for r in range(n - 2):                        # the last two rollouts recorded no text at all
        length = int(rng.integers(1, 40))
        rows.append(pd.DataFrame({"row": r, "t": np.arange(1, length + 1),
                                  "repetition": rng.random(length), "compression": rng.random(length) * 4,
                                  "surprisal": rng.random(length) * 3}))
    signals = pd.concat(rows, ignore_index=True)
    flips = pm.sample(frac=0.5, random_state=seed)[["row", "prompt", "alpha"]].assign(
        time=rng.integers(0, 5, n // 2) * 8, event=rng.random(n // 2) < 0.5)
    thresholds = {"repetition": 0.9, "compression": 3.5, "surprisal": 2.8}
    for text in (("repetition", "compression", "surprisal"), ("repetition", "compression")):
        got = deaths_by_signal(signals, pm, thresholds, flips, text_signals=text)
        want = _deaths_by_signal_loop(signals, pm, thresholds, flips, text)
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
