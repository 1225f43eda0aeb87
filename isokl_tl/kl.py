"""Per-token KL(P_steered || P_base), in float32.

`token_kl` is the arithmetic. The rollout engine calls it once per decode step on the steered rows
and their base partners (the base model teacher-forced on the steered tokens, in the same batched
forward), so a [batch, pos, d_vocab] tensor never exists. `teacher_forced_kl` is the
straightforward reference: full forward passes of the steered and the base model over finished
rollouts, chunked over rows; tests compare the two.
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from isokl_tl.engine import kl_from_logprobs
from isokl_tl.hooks import steer
from isokl_tl.tokens import chunks


def token_kl(steered_logits: Float[Tensor, "*batch d_vocab"], base_logits: Float[Tensor, "*batch d_vocab"]
             ) -> Float[Tensor, "*batch"]:
    """KL(softmax(steered) || softmax(base)) over the last axis, computed in float32."""
    return kl_from_logprobs(torch.log_softmax(steered_logits.float(), dim=-1),
                            torch.log_softmax(base_logits.float(), dim=-1))


@torch.no_grad()
def teacher_forced_kl(model: HookedTransformer, tokens: Int[Tensor, "batch pos"],
                      mask: Int[Tensor, "batch pos"], prompt_width: int, *, hook: str,
                      direction: Float[Tensor, " d_model"], coeff: Float[Tensor, " batch"],
                      method: str = "add", start: int = 0, rows_per_chunk: int = 4
                      ) -> Float[Tensor, "batch gen"]:
    """Reference per-token KL for left-padded `prompt + rollout` sequences.

    Column j of the result is the KL of the distribution over generated token j, i.e. the logits
    at sequence position prompt_width + j - 1. Positions whose token is masked are NaN.
    """
    n_gen = tokens.shape[1] - prompt_width
    out = torch.full((tokens.shape[0], n_gen), float("nan"))
    for sl in chunks(tokens.shape[0], rows_per_chunk):
        t, m = tokens[sl], mask[sl]
        with steer(model, hook, direction, coeff[sl], method=method, start=start):
            ls = model(t, attention_mask=m)[:, prompt_width - 1:-1]
        lb = model(t, attention_mask=m)[:, prompt_width - 1:-1]
        kl = token_kl(ls, lb).cpu()
        valid: Bool[Tensor, "b gen"] = m[:, prompt_width:].bool().cpu()
        out[sl] = torch.where(valid, kl, torch.full_like(kl, float("nan")))
    return out
