"""Thinking blocks: which forks fall inside one that the model opened and has not yet closed.

Reasoning models (Qwen3 and others) write `<think> ... </think>` before they answer. With the
*inline* splice a fork continues the assistant turn, so a fork inside an open block asks for the
answer while the model is still thinking, unless the splice first closes the block
(`--splice-close "</think>\\n\\n"`); a close at a fork after the block has ended is a stray tag in
the answer. DESIGN asks the inline splice to close an open block only: the splice is one fixed text
for every fork today, so the run counts the forks each way (`thinking_report`) and says where the
splice and the rollouts disagree (`thinking_warning`). The markers are looked for as single tokens
of the vocabulary; a model without them (the embedded SmolLM2) has no thinking blocks.
"""

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

OPEN, CLOSE = "<think>", "</think>"


def marker_ids(tokenizer, open_text: str = OPEN, close_text: str = CLOSE) -> tuple[int, int] | None:
    """The ids of the opening and closing markers where each is one token, else None."""
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in (open_text, close_text)]
    return (ids[0][0], ids[1][0]) if all(len(i) == 1 for i in ids) else None


def open_at(prompt: Int[Tensor, "row prompt_pos"], prompt_mask: Int[Tensor, "row prompt_pos"],
            tokens: Int[Tensor, "row gen"], forks: list[int], ids: tuple[int, int]
            ) -> Bool[np.ndarray, "row fork"]:
    """Per rollout row and fork t: whether `prompt + rollout[:t]` ends inside an open block (its
    last opening marker after its last closing one). A fork past a row's tokens reads all of them."""
    seq = torch.cat([prompt.masked_fill(prompt_mask == 0, -1), tokens], 1)
    pos = torch.arange(seq.shape[1]).expand_as(seq)
    last_open = torch.where(seq == ids[0], pos, -1).cummax(1).values
    last_close = torch.where(seq == ids[1], pos, -1).cummax(1).values
    at = (prompt.shape[1] + torch.tensor(forks) - 1).clamp(max=seq.shape[1] - 1)
    return (last_open[:, at] > last_close[:, at]).numpy()


def thinking_report(frame, rollouts, tokenizer, splice: dict) -> dict | None:
    """For an inline splice on a model with thinking markers: how many evaluated forks (rows of a
    pmass `frame`) fall inside an open block, and whether the splice closes one; None otherwise."""
    ids = marker_ids(tokenizer)
    if splice.get("mode") != "inline" or ids is None or not len(frame):
        return None
    forks = sorted(set(frame.fork.astype(int)))
    inside = open_at(rollouts.prompt, rollouts.prompt_mask, rollouts.tokens, forks, ids)
    col = {t: i for i, t in enumerate(forks)}
    n_in = int(inside[frame.row.to_numpy(int), [col[t] for t in frame.fork.astype(int)]].sum())
    return {"markers": [OPEN, CLOSE], "forks": int(len(frame)), "forks_inside": n_in,
            "splice_closes": bool(splice.get("close"))}


def thinking_warning(report: dict | None) -> str | None:
    """What a run should say about its thinking blocks, if anything."""
    if not report:
        return None
    n, inside, closes = report["forks"], report["forks_inside"], report["splice_closes"]
    if inside and not closes:
        return (f"{inside} of {n} forks fall inside an open {OPEN} block and the inline splice does not "
                f"close it: the answer is asked for mid-thought (--splice-close \"{CLOSE}\\n\\n\")")
    if closes and inside < n:
        return (f"{n - inside} of {n} forks fall outside any open {OPEN} block, where the inline splice's "
                "close is a stray tag (the splice is one text for every fork)")
    return None
