"""Thinking blocks: which forks fall inside one that the model opened and has not yet closed.

Reasoning models (Qwen3 and others) write `<think> ... </think>` before they answer. With the
*inline* splice a fork continues the assistant turn, so a fork inside an open block must close it
before asking for the answer, and a fork after the block has ended must not (a stray close). On a
model whose vocabulary has both markers as single tokens, `splice.Splice` therefore has two
splices, without and with the close (`</think>\n` unless `--splice-close` says otherwise); fork
pmass reads both at every fork and keeps, per fork, the one `open_at` says its rollout needs.
A model without the markers (the embedded SmolLM2) has one splice, as given. `thinking_report`
counts the forks inside a block for the run's summary.
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
    at = (prompt.shape[1] + torch.tensor(forks, dtype=torch.long) - 1).clamp(max=seq.shape[1] - 1)
    return (last_open[:, at] > last_close[:, at]).numpy()


def thinking_report(frame, rollouts, tokenizer, splice: dict) -> dict | None:
    """For an inline splice on a model with thinking markers: how many evaluated forks (rows of a
    pmass `frame`) fall inside an open block, where the splice closed it; None otherwise."""
    ids = marker_ids(tokenizer, splice.get("think_open", OPEN), splice.get("think_close", CLOSE))
    if splice.get("mode") != "inline" or ids is None or not len(frame):
        return None
    forks = sorted(set(frame.fork.astype(int)))
    inside = open_at(rollouts.prompt, rollouts.prompt_mask, rollouts.tokens, forks, ids)
    col = {t: i for i, t in enumerate(forks)}
    n_in = int(inside[frame.row.to_numpy(int), [col[t] for t in frame.fork.astype(int)]].sum())
    return {"markers": [splice.get("think_open", OPEN), splice.get("think_close", CLOSE)],
            "forks": int(len(frame)), "forks_inside": n_in}
