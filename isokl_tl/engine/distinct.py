"""A prefill's distinct rows. A sweep repeats every prompt at every alpha, and every base partner
repeats its prompt at coefficient 0: at prefill such rows compute the same numbers, below the first
steered block whenever their prompts are equal, and from it on when their steering coefficients
are equal too. `FastDecoder` runs each block once per distinct row and copies the keys and values
to every row that repeats it.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from isokl_tl.hooks import Steering, SteeringGroup, handles


@dataclass(frozen=True)
class Distinct:
    """A prefill's distinct rows: the blocks below the first steering site run on `below` (one
    batch row per distinct prompt), the blocks from it on run on `above` (one per distinct prompt
    and steering coefficients); `low` and `high` give each batch row its index among them, `lift`
    each row of `above` its index in `below`."""

    below: Tensor
    low: Tensor
    above: Tensor
    high: Tensor
    lift: Tensor


def first_of_each(key: Int[Tensor, "row k"]) -> tuple[Tensor, Tensor]:
    """(the first row of each distinct row of `key`, ascending; every row's index among them)."""
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    n, dev = len(key), key.device
    first = torch.full((int(inverse.max()) + 1,), n, device=dev).scatter_reduce(
        0, inverse, torch.arange(n, device=dev), "amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=dev)
    return first[order], rank[inverse]


def distinct_rows(tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"],
                  steering: Steering | SteeringGroup | None, site_block: int, lower_rows: int) -> Distinct | None:
    """The distinct rows of a prefill of `tokens` (`mask`), steered by `steering` from block
    `site_block` on, whose blocks below it would run on the first `lower_rows` rows; None where
    no row repeats another. Coefficients count only where they act at prefill (not for steering
    that starts at a later position)."""
    prompt = torch.cat([tokens, mask], 1)
    coeffs = [h.coeff.float().view(torch.int32).long()[:, None] for h in handles(steering)
              if torch.is_tensor(h.coeff) and h.start < tokens.shape[1]]
    below, low = first_of_each(prompt)
    above, high = first_of_each(torch.cat([prompt, *coeffs], 1))
    if len(above) == len(tokens) and (site_block == 0 or len(below) == lower_rows):
        return None
    return Distinct(below, low, above, high, low[above])
