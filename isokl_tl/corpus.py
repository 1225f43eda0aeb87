"""Steering strength measured on fixed text: the rise in cross-entropy of the steered model over the
base model on a held-out corpus, teacher-forced (no rollout).

The `delta_ce` calibration statistic (`search.STATISTICS`) is the mean, over every predicted token
of the corpus passages, of  CE_steered - CE_base  = log p_base(x_t | x_<t) - log p_steered(x_t | x_<t).
Unlike the rollout KL statistics it does not depend on what the steered model would write: both
models read the same human text. It can be negative at small coefficients (a direction can make
some text more likely): the search climbs past coefficients where it is not yet positive
(`search.steps` judges saturation on positive values only).
"""

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from isokl_tl.hooks import Site, steer_sites
from isokl_tl.tokens import chunks, left_pad, pad_id, require_tokenizer, text_ids

MAX_TOKENS = 256            # a passage's tokens beyond this are not scored
CE_ROWS = 16                # passages per teacher-forced batch, unless told


def corpus_ids(tokenizer, texts: list[str], *, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Each passage as token ids, after the tokenizer's BOS when it has one, cut to `max_tokens`."""
    tokenizer = require_tokenizer(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = [(bos + text_ids(tokenizer, t))[:max_tokens] for t in texts]
    short = [i for i, ids in enumerate(out) if len(ids) < 2]
    if short:
        raise ValueError(f"corpus passage {short[0]} has fewer than 2 tokens: nothing to predict")
    return out


@torch.no_grad()
def token_ce(model: HookedTransformer, ids: list[list[int]], coeffs: Float[Tensor, " row"], *,
             sites: list[Site], site: Int[Tensor, " row"], rows_per_batch: int | None = None) -> Float[Tensor, "row pos"]:
    """Per row (a passage, a coefficient, a site index): the steered model's cross-entropy of every
    token after the first, teacher-forced, in float32; right-aligned like the passages (column j of
    a row of n tokens is its token j - (width - n) + 1), NaN where the row has no token."""
    tokens, mask = left_pad(ids, pad_id(model.tokenizer), model.cfg.device)
    out = torch.full((len(ids), tokens.shape[1] - 1), float("nan"))
    for sl in chunks(len(ids), rows_per_batch or CE_ROWS):
        rows = site[sl]
        per_site = [torch.where(rows == i, coeffs[sl], 0.0) for i in range(len(sites))]
        with steer_sites(model, sites, per_site):
            logits = model(tokens[sl], attention_mask=mask[sl])[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        ce = -logp.gather(-1, tokens[sl, 1:, None])[..., 0].cpu()
        valid = mask[sl, :-1].bool().cpu() & mask[sl, 1:].bool().cpu()
        out[sl] = torch.where(valid, ce, float("nan"))
    return out


def delta_ce(steered: Float[Tensor, "row pos"], base: Float[Tensor, "row pos"]
             ) -> tuple[Float[np.ndarray, "row pos"], np.ndarray]:
    """(CE_steered - CE_base per token, the mask of tokens scored), as a rollout's (kl, mask) are
    given to the calibration search."""
    d = (steered - base).numpy()
    return d, ~np.isnan(d)
