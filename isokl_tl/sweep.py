"""The alpha sweep's rows: every prompt at every alpha, alpha-major (all prompts at the first
alpha, then all at the next), each steered at its alpha times the c* of its sign."""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from isokl_tl.calibrate import Calibration, c_star_for


@dataclass(frozen=True)
class SweepRows:
    """One entry per rollout: its prompt's token ids, the prompt's index, its alpha and the
    coefficient it is steered at (alpha x c*)."""

    prompts: list[list[int]]
    index: Int[Tensor, " row"]
    alpha: Float[Tensor, " row"]
    coeff: Float[Tensor, " row"]


def sweep_rows(ids: list[list[int]], alphas: list[float], cals: dict[int, Calibration]) -> SweepRows:
    """The sweep of `ids` over `alphas`; a negative alpha is a multiple of -v's c* where the run
    calibrated -v (`calibrate.c_star_for`)."""
    alpha = torch.tensor([float(a) for a in alphas for _ in ids])
    c_star = torch.tensor([c_star_for(a, cals) for a in alphas for _ in ids])
    return SweepRows(prompts=[p for _ in alphas for p in ids],
                     index=torch.tensor([i for _ in alphas for i in range(len(ids))]),
                     alpha=alpha, coeff=alpha * c_star)
