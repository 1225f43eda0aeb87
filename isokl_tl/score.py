"""Greedy per-step scoring of steered rows against their base partners.

At every decode step the rollout engine needs, for each steered row, the next token (the steered
argmax), KL(P_steered || P_base), the steered log-probability of that token, and whether the base
model's argmax agrees. `greedy_scores` returns all four. On CUDA (with Triton) it is one kernel
that reads each row's logits once, in their own dtype, and never writes a float32 copy of the
[batch, d_vocab] logits (`isokl_tl.score_triton`); elsewhere it is the plain PyTorch arithmetic,
which is also the reference the kernel is tested against.

KL is computed in float32 as  sum_i p_i (x_i - y_i) - logsumexp(x) + logsumexp(y)  for steered
logits x and base logits y; a row scored against itself gets exactly 0.
"""

import importlib.util
from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from isokl_tl.kl import kl_from_logprobs


def row_scores(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"],
               choose: Callable[[Tensor], Tensor] | None = None
               ) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"],
                          Bool[Tensor, " batch"]]:
    """(next token, KL, log-probability of the next token, base argmax agrees) per steered row.

    Rows 0..batch-1 of `logits` are the steered rows; row i is scored against row `base_row[i]`
    (its base partner, or i itself for a row that is its own base). `choose` maps the steered
    log-probabilities to the next tokens (default: argmax)."""
    b = len(base_row)
    logp = torch.log_softmax(logits.float(), dim=-1)
    ls, lb = logp[:b], logp[base_row]
    nxt = ls.argmax(-1) if choose is None else choose(ls)
    return nxt, kl_from_logprobs(ls, lb), ls.gather(-1, nxt[:, None])[:, 0], lb.argmax(-1) == nxt


def greedy_scores_torch(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"]
                        ) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"],
                                   Bool[Tensor, " batch"]]:
    """`row_scores` with the argmax as next token: the reference for the Triton kernel."""
    return row_scores(logits, base_row)


def greedy_scores(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"]
                  ) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"],
                             Bool[Tensor, " batch"]]:
    """`greedy_scores_torch`, as one Triton kernel on CUDA when Triton is installed."""
    if logits.is_cuda and triton_available():
        from isokl_tl.score_triton import greedy_scores_triton

        return greedy_scores_triton(logits, base_row)
    return greedy_scores_torch(logits, base_row)


def record_torch(nxt: Int[Tensor, " batch"], kl: Float[Tensor, " batch"], lp: Float[Tensor, " batch"],
                 agree: Bool[Tensor, " batch"], st: dict) -> Int[Tensor, " rows"]:
    """Record one step's scores at column `st["col"]` of a rollout's result buffers (`st["out"]`:
    tokens, kl, logprob, base_agree [batch, window]; gen_len, eos [batch]): rows already finished
    get -1 / NaN / False and stop counting; rows whose token is an EOS id (`st["eos_ids"]`) are
    finished from now on. Returns the next token of every row of the forward batch, the base
    partners' included (`st["next"]`: the steered rows, then the partners of rows `st["has"]`)."""
    out, col = st["out"], st["col"]
    alive = ~out["eos"]
    out["tokens"].index_copy_(1, col, torch.where(alive, nxt, -1)[:, None])
    out["kl"].index_copy_(1, col, torch.where(alive, kl, float("nan"))[:, None])
    out["logprob"].index_copy_(1, col, torch.where(alive, lp, float("nan"))[:, None])
    out["base_agree"].index_copy_(1, col, (alive & agree)[:, None])
    out["gen_len"].add_(alive.long())
    out["eos"].logical_or_(torch.isin(nxt, st["eos_ids"]))
    st["next"][:len(nxt)] = nxt
    st["next"][len(nxt):] = nxt[st["has"]]
    return st["next"]


def greedy_record(logits: Float[Tensor, "rows d_vocab"], base_row: Int[Tensor, " batch"], st: dict
                  ) -> Int[Tensor, " rows"]:
    """`record_torch` of `greedy_scores`; on CUDA with Triton the scoring kernel writes the
    records itself (no launch per buffer)."""
    if logits.is_cuda and triton_available():
        from isokl_tl.score_triton import greedy_record_triton

        return greedy_record_triton(logits, base_row, st)
    return record_torch(*greedy_scores_torch(logits, base_row), st)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
