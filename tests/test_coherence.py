"""Coherence signals (repetition, compression), deaths by signal and which signal kills first."""

import zlib

import numpy as np
import pandas as pd
import pytest

from isokl_tl.coherence import (
    THRESHOLDS,
    compression,
    deaths_by_signal,
    first_signal,
    repetition,
    rollout_signals,
    signal_frame,
    signal_table,
    signals_markdown,
    surprisal,
    trailing_windows,
    unsteered_levels,
    unsteered_markdown,
    unsteered_warnings,
)


def test_repetition_counts_tokens_inside_an_ngram_seen_before():
    fresh = list(range(40))
    loop = list(range(10)) * 4
    assert np.isnan(repetition(fresh)[:31]).all() and (repetition(fresh)[31:] == 0).all()     # the defaults
    assert np.isnan(repetition(fresh, n=4, k=16)[:15]).all()
    r = repetition(loop, n=4, k=16)
    # the loop's 4-grams come back from its 14th token on (the second lap's 4th), covering its 11th
    # to 14th: at the 16th, tokens 11-16 lie inside repeated 4-grams; by token 30 all 16 do
    assert r[29] == 1.0 and r[15] == pytest.approx(6 / 16)
    # a phrase said twice: every token of the second saying lies inside a repeat, once the n-gram is complete
    phrase = list(range(100, 112))
    said = list(range(30)) + phrase + list(range(200, 210)) + phrase + list(range(300, 330))
    r = repetition(said, n=8, k=32)
    at = len(said) - 30 - 1                    # the second saying's last token
    assert r[at] == pytest.approx(12 / 32) and r[at - 1] == pytest.approx(11 / 32)
    # its first 7 tokens wait for the first 8-gram to complete, at its 8th, which brings in all 8
    assert r[at - 5] == 0 and r[at - 4] == pytest.approx(8 / 32)
    assert len(repetition([1, 2, 3])) == 3 and np.isnan(repetition([1, 2, 3])).all()


def _bytes_decode(windows):
    """A byte-level tokenizer's decoding: each id is one UTF-8 byte, decoded with replacement."""
    return [bytes(w).decode("utf-8", errors="replace") for w in windows]


def test_compression_separates_a_loop_from_prose():
    prose = ("The Sun is a star because it is a huge ball of hot gas that makes its own light by fusing "
             "hydrogen into helium deep inside its core, which is why we see it shine during the day while "
             "other stars appear only at night, far smaller")
    looped = "The Earth is round. " * 8
    assert compression([prose])[0] < 2.0 < 3.0 < compression([looped])[0]
    assert np.isnan(compression([""])).all()
    assert trailing_windows(list(range(5)), 3) == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]


def test_compression_counts_the_deflate_stream_not_zlibs_container():
    """A 32-token window holds few bytes, so zlib's 6 fixed bytes of header and checksum would
    squeeze every ratio towards 1: one emoji repeated over the window (32 byte-tokens) must still
    read as a run, at or above the default threshold, and far above prose of the same length."""
    run = "\U0001F30D" * 8                                   # 32 UTF-8 bytes
    prose = "The Moon pulls the oceans tow"                  # 29 bytes of prose
    assert len(run.encode()) == 32
    assert compression([run])[0] >= THRESHOLDS["compression"] > 2 * compression([prose])[0]
    assert compression([run])[0] > len(run.encode()) / len(zlib.compress(run.encode(), 9)) + 1


def test_compression_decodes_each_window_whole():
    """Characters split over several tokens (emoji, accents, CJK in a byte-level vocabulary) are
    decoded together: distinct emoji do not compress like a loop, as the replacement characters of
    token-by-token decoding would."""
    emoji = list("".join(chr(0x1F300 + 7 * i) for i in range(40)).encode())       # 4 byte-tokens each
    loop = list(("Ah. " * 40).encode())
    frame = signal_frame(np.array([emoji, loop[:len(emoji)]]), np.array([len(emoji)] * 2), _bytes_decode)
    last = frame.groupby("row").compression.last()
    assert last[0] < 1.2 < 2.0 < last[1]
    one_by_one = compression(["".join(_bytes_decode([[i]])[0] for i in emoji[-32:])])[0]
    assert one_by_one > 2.5 * last[0]           # what decoding token by token would have read


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
    frame = signal_frame(tokens, np.array([40, 36]), lambda ws: ["".join(f"<{i}>" for i in w) for w in ws])
    assert list(frame.groupby("row").t.max()) == [40, 36]
    # 8-grams repeat from the 12th token on, covering the 5th on: all of the last 32
    assert frame[frame.row == 0].repetition.iloc[-1] == 1.0
    assert frame.compression.notna().sum() == (40 - 31) + (36 - 31)


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


def test_rollout_signals_leave_out_the_eos_token():
    """A row that ended at EOS is read up to the token before it: its last `t` is its content
    length, and the EOS token is in no window."""
    from types import SimpleNamespace

    import torch

    tokens = torch.tensor([[7] * 40, [8] * 33 + [0] + [-1] * 6])       # row 1: 33 tokens, then EOS (id 0)
    gen_len, eos = torch.tensor([40, 34]), torch.tensor([False, True])
    r = SimpleNamespace(tokens=tokens, gen_len=gen_len, eos=eos, base_logprob=torch.full((2, 40), -0.5),
                        mask=torch.arange(40)[None, :] < gen_len[:, None])
    seen = []

    def decode_many(windows):
        seen.extend(windows)
        return ["".join(f"<{i}>" for i in w) for w in windows]
    frame, recorded = rollout_signals(r, decode_many)
    assert list(frame.groupby("row").t.max()) == [40, 33] and recorded == ("repetition", "compression", "surprisal")
    assert not any(0 in w for w in seen) and len(seen) == (40 - 31) + (33 - 31)


def test_the_unsteered_distribution_is_stated_next_to_each_threshold():
    """Only alpha-0 rollouts count; a threshold they reach gets a warning (their deaths would not be
    the steering's)."""
    t = np.arange(1, 41)
    signals = pd.concat([pd.DataFrame({"row": 0, "t": t, "repetition": np.linspace(0, 0.5, 40), "compression": 1.2,
                                       "surprisal": 3.0}),
                         pd.DataFrame({"row": 1, "t": t, "repetition": 1.0, "compression": 9.0, "surprisal": 9.0})])
    by_signal = pd.DataFrame({"row": [0, 1], "alpha": [0.0, 2.0]})
    levels = unsteered_levels(signals, by_signal).set_index("signal")
    assert levels.loc["repetition", "max"] == 0.5 and levels.loc["compression", "max"] == 1.2
    assert levels.loc["repetition", "median"] == pytest.approx(0.25)
    thresholds = {"repetition": 0.9, "compression": 2.5, "surprisal": 2.0}
    warnings = unsteered_warnings(levels.reset_index(), thresholds)
    assert len(warnings) == 1 and "surprisal threshold (3 >= 2)" in warnings[0]
    text = unsteered_markdown(levels.reset_index(), thresholds)
    assert "repetition 0.25 / 0.495 / 0.5 (threshold 0.9)" in text and "**Warning**: unsteered rollouts reach the surprisal" in text


@pytest.mark.parametrize("name", ["tiny", "smol"])
def test_batch_decoder_gives_the_texts_batch_decode_gives(name, request):
    from isokl_tl.tokens import batch_decoder

    tok = request.getfixturevalue(name).tokenizer
    fast = batch_decoder(tok)
    assert fast != tok.batch_decode                       # these tokenizers take the one-call path
    gen = np.random.default_rng(0)
    emoji = tok("🙂 café, naïve 😀😀 — fin", add_special_tokens=False)["input_ids"]
    special = [i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None]
    windows = [gen.integers(0, len(tok), 32).tolist() for _ in range(200)]
    windows += [emoji, emoji[1:], emoji[:-1], special + emoji + special, special, []]
    windows += [emoji[i:i + 3] for i in range(len(emoji))]         # characters split across windows
    assert fast(windows) == tok.batch_decode(windows)


def test_batch_decoder_keeps_batch_decode_where_python_decodes():
    from transformers import PreTrainedTokenizerFast

    from isokl_tl.models.tiny import tiny_tokenizer
    from isokl_tl.tokens import batch_decoder

    base = tiny_tokenizer()
    cleans = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, clean_up_tokenization_spaces=True)
    assert batch_decoder(cleans) == cleans.batch_decode

    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    loud = Shouting(tokenizer_object=base.backend_tokenizer)
    assert batch_decoder(loud) == loud.batch_decode
    assert batch_decoder(loud)([[5, 6, 7]]) == loud.batch_decode([[5, 6, 7]])
