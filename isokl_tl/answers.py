"""Is the steered model still *right*? The held-out questions have known answers, so each fork's
preferred answer (`p_true > 0.5`: more of its answer mass on the true set) can be scored.

pmass says whether the model still puts mass on an answer token; these say whether that answer is
the correct one, and whether the unsteered model knew it in the first place: a model right on only
half of a balanced set (or answering "true" to everything) cannot show that steering made it
wrong. An answer *flips* at a fork where the steered model prefers the wrong answer to a question
the unsteered model answered right at fork 0.
"""

import numpy as np
import pandas as pd

COLUMNS = ["alpha", "n", "accuracy_fork0", "accuracy_last", "says_true", "flipped"]


def score_forks(pmass: pd.DataFrame, answers: list[bool | None]) -> pd.DataFrame:
    """`pmass` with the known answer, whether the fork's preferred answer is right, whether its
    question can flip (right unsteered at fork 0: `can_flip`) and whether it flipped (can flip,
    wrong here); forks of questions without a known answer are dropped."""
    known = pd.Series({i: a for i, a in enumerate(answers) if a is not None}, dtype=object)
    frame = pmass[pmass.prompt.isin(known.index)].copy()
    frame["answer"] = frame.prompt.map(known).astype(bool)
    frame["correct"] = (frame.p_true > 0.5) == frame.answer
    base = frame[(frame.alpha == 0) & (frame.fork == 0)].groupby("prompt").correct.first()
    frame["can_flip"] = frame.prompt.map(base).fillna(False).astype(bool)
    frame["flipped"] = frame.can_flip & ~frame.correct
    return frame


def flip_deaths(pmass: pd.DataFrame, answers: list[bool | None]) -> pd.DataFrame:
    """The answer flip as a death, per rollout row that can flip (its question has a known answer
    the unsteered model gets right at fork 0): time, the first fork token where the steered
    model prefers the wrong answer (event), or its last evaluated fork (censored)."""
    cols = ["row", "prompt", "alpha", "time", "event"]
    scored = score_forks(pmass, answers)
    scored = scored[scored.can_flip]
    rows = []
    for row, g in scored.sort_values("fork").groupby("row", sort=True):
        hit = g[g.flipped]
        rows.append({"row": int(row), "prompt": int(g.prompt.iloc[0]), "alpha": float(g.alpha.iloc[0]),
                     "time": int(hit.fork.iloc[0] if len(hit) else g.fork.iloc[-1]), "event": bool(len(hit))})
    return pd.DataFrame(rows, columns=cols)


def answer_table(pmass: pd.DataFrame, answers: list[bool | None]) -> pd.DataFrame:
    """Per alpha: rollouts scored, accuracy at fork 0 and at each rollout's last evaluated fork,
    the share of forks answering "true", and, of the rollouts that can flip (their question's
    unsteered answer at fork 0 is right), the share whose answer flipped at some fork (NaN where
    none can)."""
    scored = score_forks(pmass, answers)
    rows = []
    for alpha, g in scored.groupby("alpha", sort=True):
        per_row = g.sort_values("fork").groupby("row")
        rows.append({"alpha": float(alpha), "n": per_row.ngroups,
                     "accuracy_fork0": float(g[g.fork == 0].correct.mean()) if (g.fork == 0).any() else np.nan,
                     "accuracy_last": float(per_row.correct.last().mean()),
                     "says_true": float((g.p_true > 0.5).mean()),
                     "flipped": float(per_row.flipped.any()[per_row.can_flip.first()].mean())
                     if per_row.can_flip.first().any() else np.nan})
    return pd.DataFrame(rows, columns=COLUMNS)


def answers_markdown(table: pd.DataFrame, answers: list[bool | None]) -> str:
    """The table, after a sentence on what the unsteered model knows."""
    known = [a for a in answers if a is not None]
    base = table[table.alpha == 0]
    if not known or base.empty:
        return ""
    acc, says = float(base.accuracy_fork0.iloc[0]), float(base.says_true.iloc[0])
    lines = [f"Answers: of the {len(known)} held-out questions ({sum(known)} true, {len(known) - sum(known)} false), "
             f"the unsteered model prefers the right answer on {acc:.0%} at fork 0 and answers \"true\" at "
             f"{says:.0%} of its forks"
             + (" (no better than always answering one way: pmass here measures only that it still answers)"
                if acc <= max(np.mean(known), 1 - np.mean(known)) else "") + ".", "",
             "| alpha | n | right at fork 0 | right at the last fork | forks answering true "
             "| answer flipped (of those right unsteered) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for t in table.itertuples():
        lines.append(f"| {t.alpha:g} | {t.n} | {t.accuracy_fork0:.2f} | {t.accuracy_last:.2f} | {t.says_true:.2f} "
                     f"| {'n/a' if np.isnan(t.flipped) else f'{t.flipped:.2f}'} |")
    return "\n".join(lines) + "\n"
