"""Coherence along a rollout: signals of collapse that pmass cannot see, from the saved tokens.

A steered model can keep answering (pmass high) while its text loops or degenerates into emoji
runs. Three signals per generated token `t`, each over a trailing window and undefined (NaN) until
the window is full:

- **repetition**: the share of the last `REPETITION_WINDOW` tokens that lie inside an n-gram
  (`REPETITION_NGRAM` tokens) already generated earlier in the rollout (an n-gram counts once it
  is complete, so the signal at `t` reads the first `t` tokens only). Prose repeats an 8-gram now
  and then; a loop repeats them all.
- **compression**: how far DEFLATE (zlib's algorithm) compresses the text of the last
  `COMPRESSION_WINDOW` tokens, decoded together (raw UTF-8 bytes / bytes of the raw DEFLATE
  stream; a character split over several tokens is decoded whole, not as replacement
  characters). Prose of that length hardly compresses; loops and runs of one emoji compress
  several-fold. The zlib container's 6 fixed bytes (header and checksum) are not counted: in a
  window of 32 tokens they are a large share of the output and squeeze every ratio towards 1 (8
  repeats of one 4-byte emoji: 2.1 with them, 3.6 without).
- **surprisal**: the mean, over the last `SURPRISAL_WINDOW` tokens, of minus the base model's
  log-probability of each steered token (`Rollouts.base_logprob`, recorded while decoding): how
  unlikely the unsteered model finds the text. Unsteered greedy text is its own argmax, so it sits
  near the model's entropy; steered text it would never write scores high.

The signals read the rollout's content: an EOS token that ended it is not part of the text. Their
`t` counts the tokens generated so far (1 for the first), as a fork at `t` reads the first `t`.
Each defines a death: the first token where the signal reaches its threshold. The defaults sit
above what the embedded SmolLM2-135M-Instruct's unsteered rollouts reach (`THRESHOLDS`; how they
were chosen: docs/science.md). A fifth death comes from the forks rather than the text: the answer
*flips* (`answers.flip_deaths`). `deaths_by_signal` turns signals (and pmass and flip deaths)
into one time/event per rollout and signal, `first_signal` says which kills first.
"""

import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float

REPETITION_NGRAM = 8
REPETITION_WINDOW = 32
COMPRESSION_WINDOW = 32
SURPRISAL_WINDOW = 16
SURPRISAL_THRESHOLD = 2.0
THRESHOLDS = {"repetition": 1.0, "compression": 3.0, "surprisal": SURPRISAL_THRESHOLD}   # docs/science.md
# bumped when a signal's definition changes, so that a saved run's survival stage is read again
# (2: repetition counts tokens inside a repeated n-gram, compression decodes each window whole, no EOS;
# 3: compression counts the raw DEFLATE stream, without zlib's header and checksum)
SIGNALS_VERSION = 3
TEXT_SIGNALS = ("repetition", "compression", "surprisal")      # read from the rollout's tokens
SIGNALS = ("pmass",) + TEXT_SIGNALS + ("flip",)
DEATH_SIGNALS = SIGNALS + ("any",)


def repetition(tokens: Sequence[int], *, n: int = REPETITION_NGRAM, k: int = REPETITION_WINDOW) -> np.ndarray:
    """Per position t: the share of the last `k` tokens that lie inside an n-gram which occurred
    earlier in `tokens`, among the n-grams complete by t (NaN before `k`)."""
    seen: set[tuple[int, ...]] = set()
    repeats = np.zeros(len(tokens), dtype=bool)          # the n-gram ending here occurred before
    for j in range(n - 1, len(tokens)):
        gram = tuple(tokens[j - n + 1:j + 1])
        repeats[j] = gram in seen
        seen.add(gram)
    # token j is covered from the first repeated n-gram's end e in [j, j + n - 1] on
    ends = np.flatnonzero(repeats)
    covered_at = np.full(len(tokens), np.inf)
    if len(ends):
        nxt = np.searchsorted(ends, np.arange(len(tokens)))           # the first repeat ending at or after j
        ok = nxt < len(ends)
        e = ends[np.minimum(nxt, len(ends) - 1)]
        covered_at = np.where(ok & (e <= np.arange(len(tokens)) + n - 1), e, np.inf)
    out = np.full(len(tokens), np.nan)
    if len(tokens) >= k:
        windows = np.lib.stride_tricks.sliding_window_view(covered_at, k)    # window ending at t = k-1+w
        t = np.arange(k - 1, len(tokens))
        out[k - 1:] = (windows <= t[:, None]).sum(1) / k
    return out


def compression(texts: Sequence[str]) -> np.ndarray:
    """Per text: its UTF-8 bytes / the bytes of their raw DEFLATE stream at level 9 (no zlib header
    or checksum; NaN for an empty text)."""
    out = np.full(len(texts), np.nan)
    for i, text in enumerate(texts):
        raw = text.encode()
        if raw:
            deflate = zlib.compressobj(9, zlib.DEFLATED, -15)      # negative window bits: raw stream
            out[i] = len(raw) / len(deflate.compress(raw) + deflate.flush())
    return out


def trailing_windows(ids: Sequence[int], k: int = COMPRESSION_WINDOW) -> list[list[int]]:
    """The last `k` ids at each position from the `k`-th on."""
    ids = ids if isinstance(ids, list) else list(ids)     # slices of a list are lists already
    return [ids[t - k + 1:t + 1] for t in range(k - 1, len(ids))]


def surprisal(base_logprob: Float[np.ndarray, " t"], *, k: int = SURPRISAL_WINDOW) -> Float[np.ndarray, " t"]:
    """Per position: the mean of -log p_base over the last `k` tokens (NaN before `k`, and where
    the log-probabilities were not recorded)."""
    x = -np.asarray(base_logprob, dtype=float)
    out = np.full(len(x), np.nan)
    if len(x) >= k:
        out[k - 1:] = np.convolve(x, np.ones(k), mode="valid") / k
    return out


def signal_frame(tokens: np.ndarray, content: np.ndarray, decode_many, base_logprob: np.ndarray | None = None
                 ) -> pd.DataFrame:
    """Long format, one row per (rollout row, generated token of its content): `repetition`,
    `compression`, `surprisal` (NaN without `base_logprob`). `content[r]` is row r's number of
    generated tokens before any EOS; `decode_many(list of id lists)` turns each id list into its
    text (a tokenizer's `batch_decode`, or `tokens.batch_decoder`'s faster equal); every trailing
    window is decoded in one call."""
    ids = [np.asarray(tokens[r, :int(content[r])]).tolist() for r in range(len(tokens))]    # Python ints
    windows = [trailing_windows(row) for row in ids]
    texts = iter(decode_many([w for row in windows for w in row]) if any(windows) else [])
    rows = []
    for r, row in enumerate(ids):
        n = len(row)
        comp = np.full(n, np.nan)
        comp[COMPRESSION_WINDOW - 1:] = compression([next(texts) for _ in windows[r]])
        sur = surprisal(base_logprob[r, :n]) if base_logprob is not None else np.full(n, np.nan)
        rows.append(pd.DataFrame({"row": r, "t": np.arange(1, n + 1), "repetition": repetition(row),
                                  "compression": comp, "surprisal": sur}))
    cols = ["row", "t", *TEXT_SIGNALS]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


def rollout_signals(rollouts, decode_many) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """`signal_frame` of a sweep's `Rollouts` (their content: an EOS token that ended a row is not
    text), and the text signals they recorded (no surprisal for rollouts saved before base
    log-probabilities were)."""
    r = rollouts
    recorded = tuple(k for k in TEXT_SIGNALS if k != "surprisal" or not bool(r.base_logprob[r.mask].isnan().all()))
    content = (r.gen_len - r.eos.long()).numpy()
    return signal_frame(r.tokens.numpy(), content, decode_many, r.base_logprob.numpy()), recorded


def dying_by(by_signal: pd.DataFrame, pmass_deaths: pd.DataFrame, signal: str) -> pd.DataFrame:
    """The survival table's rows (`survival.deaths`'s) dying by `signal` instead of pmass: the
    same rollouts (for flips, those that can flip) with that signal's time and event."""
    if signal == "pmass":
        return pmass_deaths
    chosen = by_signal[by_signal.signal == signal].set_index("row")
    if chosen.empty:
        raise ValueError(f"no rollout can die by {signal!r} here (no rollout was recorded with it, or, for "
                         "flips, no question has a known answer the unsteered model gets right)")
    rows = pmass_deaths[pmass_deaths.row.isin(chosen.index)]
    return rows.assign(time=rows.row.map(chosen.time), event=rows.row.map(chosen.event))


def deaths_by_signal(signals: pd.DataFrame, pmass_deaths: pd.DataFrame, thresholds: dict[str, float],
                     flip_deaths: pd.DataFrame | None = None, *, text_signals: tuple[str, ...] = TEXT_SIGNALS
                     ) -> pd.DataFrame:
    """One row per (rollout, signal): time (the token of death, or of censoring), event. pmass
    deaths come from `survival.deaths`, flips (where given) from `answers.flip_deaths` (only rows
    that can flip have them); a text signal dies at the first token where it reaches its threshold
    and is censored at the rollout's last token (only `text_signals`: leave out one never
    recorded, such as the surprisal of rollouts saved before it was). `any`: the first death of all, or, with none,
    censored at the earliest censoring (where one signal stopped being seen)."""
    keys = ["row", "prompt", "alpha", "weak"]
    base = pmass_deaths[keys].reset_index(drop=True)
    parts = [base.assign(signal="pmass", time=pmass_deaths.time.to_numpy(), event=pmass_deaths.event.to_numpy())]
    # each rollout's text signals in turn: the first token at its threshold, else censored at the
    # rollout's last token (where it has no signals: its pmass time)
    k = len(text_signals)
    first = pd.DataFrame({name: signals[signals[name] >= thresholds[name]].groupby("row").t.min()
                          for name in text_signals}, columns=list(text_signals))
    hit = first.reindex(base.row).to_numpy(dtype=float).ravel()          # row by row, signal by signal
    last = base.row.map(signals.groupby("row").t.max()).fillna(pmass_deaths.time.reset_index(drop=True))
    parts.append(base.loc[base.index.repeat(k)].assign(signal=np.tile(list(text_signals), len(base)),
                                                      time=np.where(np.isnan(hit), np.repeat(last.to_numpy(), k), hit),
                                                      event=~np.isnan(hit)))
    if flip_deaths is not None and len(flip_deaths):
        weak = pmass_deaths.set_index("row").weak
        flips = flip_deaths[["row", "prompt", "alpha"]].reset_index(drop=True)
        parts.append(flips.assign(weak=flips.row.map(weak).fillna(False).astype(bool), signal="flip",
                                  time=flip_deaths.time.to_numpy(), event=flip_deaths.event.to_numpy()))
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.assign(time=frame.time.astype(int), event=frame.event.astype(bool))
    # per row: its first death (the earliest time, the first signal listed at a tie); else censored
    # where the first signal stopped being observed
    ordered = frame.sort_values(["row", "time"], kind="stable")      # a stable sort keeps the listed order
    dead = ordered[ordered.event].drop_duplicates("row")
    censored = ordered[~ordered.row.isin(dead.row)].drop_duplicates("row")
    earliest = pd.concat([dead, censored]).sort_values("row", kind="stable")
    earliest = earliest[keys].assign(signal="any", time=earliest.time.to_numpy(),
                                     event=earliest.row.isin(dead.row).to_numpy())
    return pd.concat([frame, earliest], ignore_index=True)


def first_signal(by_signal: pd.DataFrame) -> pd.DataFrame:
    """Per alpha: how many rollouts each signal killed first (ties count for each), and how many
    no signal killed."""
    rows = []
    for alpha, g in by_signal[by_signal.signal != "any"].groupby("alpha", sort=True):
        counts = dict.fromkeys(SIGNALS, 0)
        alive = 0
        for _, r in g.groupby("row"):
            dead = r[r.event]
            if dead.empty:
                alive += 1
                continue
            for name in dead[dead.time == dead.time.min()].signal:
                counts[name] += 1
        rows.append({"alpha": float(alpha), **{f"first_{k}": v for k, v in counts.items()}, "none": alive})
    return pd.DataFrame(rows)


def signal_curves(by_signal: pd.DataFrame, *, keep_weak: bool = False) -> dict:
    """Kaplan-Meier curves per death signal (in `DEATH_SIGNALS` order) and alpha: {signal: {alpha: curve}}."""
    from isokl_tl.survival import kaplan_meier

    use = by_signal if keep_weak else by_signal[~by_signal.weak.astype(bool)]
    return {signal: {float(alpha): kaplan_meier(time=g.time.to_numpy(), event=g.event.to_numpy(dtype=bool))
                     for alpha, g in use[use.signal == signal].groupby("alpha", sort=True)}
            for signal in DEATH_SIGNALS if (use.signal == signal).any()}


def signal_table(by_signal: pd.DataFrame, window: int, *, keep_weak: bool = False) -> pd.DataFrame:
    """Kaplan-Meier per (signal, alpha): n, deaths, S at the window's end, the median death token."""
    return pd.DataFrame([{"signal": signal, "alpha": alpha, "n": km.n, "died": km.died, "S_end": km.at(window),
                          "median": km.median}
                         for signal, curves in signal_curves(by_signal, keep_weak=keep_weak).items()
                         for alpha, km in curves.items()])


def unsteered_levels(signals: pd.DataFrame, by_signal: pd.DataFrame, names: Sequence[str] = TEXT_SIGNALS
                     ) -> pd.DataFrame:
    """Per text signal: the median, 99th percentile and maximum over every token of the unsteered
    (alpha 0) rollouts (NaN where none has a value), the distribution a threshold should sit above."""
    base = signals[signals.row.isin(by_signal.loc[by_signal.alpha == 0, "row"].unique())]
    return pd.DataFrame([{"signal": k, "median": base[k].median(), "p99": base[k].quantile(0.99), "max": base[k].max()}
                         for k in names if k in base])


def unsteered_warnings(levels: pd.DataFrame, thresholds: dict[str, float]) -> list[str]:
    """One line per text signal whose threshold the unsteered rollouts reach (their deaths would not
    be the steering's)."""
    return [f"unsteered rollouts reach the {r.signal} threshold ({r.max:.3g} >= {thresholds[r.signal]:g}): "
            f"deaths by {r.signal} are not only the steering's; raise --{r.signal}-threshold"
            for r in levels.itertuples() if r.signal in thresholds and r.max >= thresholds[r.signal]]


def unsteered_markdown(levels: pd.DataFrame, thresholds: dict[str, float]) -> str:
    """The unsteered distribution of each text signal next to its threshold, and any warning."""
    def cell(r):
        if np.isnan(r.max):
            return f"{r.signal}: no value (no unsteered rollout is long enough)"
        return f"{r.signal} {r.median:.3g} / {r.p99:.3g} / {r.max:.3g} (threshold {thresholds[r.signal]:g})"
    lines = ["Unsteered (alpha 0) rollouts per text signal, median / 99th percentile / max over their tokens: "
             + "; ".join(cell(r) for r in levels.itertuples() if r.signal in thresholds) + "."]
    return "\n".join(lines + [f"**Warning**: {w}." for w in unsteered_warnings(levels, thresholds)]) + "\n"


def signals_markdown(table: pd.DataFrame, first: pd.DataFrame, thresholds: dict[str, float]) -> str:
    """Survival per death signal (S(end) / median death token) and which signal killed first."""
    from isokl_tl.survival import format_token

    alphas = sorted(table.alpha.unique())
    names = {"pmass": "pmass (the death rule above)",
             **{k: f"{k} >= {thresholds[k]:g}" for k in TEXT_SIGNALS if k in thresholds},
             "flip": "answer flipped (rollouts right unsteered)", "any": "any of them"}
    lines = ["Death by signal (S(end) / median death token):", "",
             "| signal | " + " | ".join(f"alpha {a:g}" for a in alphas) + " |",
             "|---|" + "---:|" * len(alphas)]
    for signal, g in table.groupby("signal", sort=False):
        by_alpha = g.set_index("alpha")
        cells = [f"{by_alpha.S_end[a]:.2f} / {format_token(by_alpha['median'][a])}" if a in by_alpha.index else "-"
                 for a in alphas]
        lines.append(f"| {names[signal]} | " + " | ".join(cells) + " |")
    shown = [k for k in SIGNALS if k in set(table.signal)]
    lines += ["", "Which signal killed first (rollouts; ties count for each):", "",
              "| alpha | " + " | ".join(shown) + " | none |", "|---:|" + "---:|" * (len(shown) + 1)]
    for r in first.itertuples():
        lines.append(f"| {r.alpha:g} | " + " | ".join(str(getattr(r, f"first_{k}")) for k in shown) + f" | {r.none} |")
    return "\n".join(lines) + "\n"
