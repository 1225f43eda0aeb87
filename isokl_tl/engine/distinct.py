"""Rows that repeat other rows, and which rows each block runs on.

A base partner repeats its steered row below the first steered block (same tokens, no steering
there), at every step: those blocks run on the steered rows only (`SharedRows`). At prefill more
rows repeat: a sweep repeats every prompt at every alpha, and every base partner repeats its
prompt at coefficient 0, so rows compute the same numbers below the first steered block whenever
their prompts are equal, and from it on when their steering coefficients are equal too
(`Distinct`). `FastDecoder` runs each block once per distinct row and copies the keys and values
to every row that repeats it; so does a fork right after the prefill (a fork at the first
generated token), whose rows' caches are then still their prompts'.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from isokl_tl.engine.kv_cache import KVCache
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
                  steering: Steering | SteeringGroup | None, site_block: int, lower_rows: int,
                  until: int | None = None) -> Distinct | None:
    """The distinct rows of a prefill of `tokens` (`mask`), steered by `steering` from block
    `site_block` on, whose blocks below it would run on the first `lower_rows` rows; None where
    no row repeats another. Coefficients count only where they act on the positions before
    `until` (default: the prefill's own; not for steering that starts later). A fork right after
    the prefill (`FastDecoder.fork`) runs the same rows alike below the site, its positions after
    the prompt's."""
    prompt = torch.cat([tokens, mask], 1)
    until = tokens.shape[1] if until is None else until
    coeffs = [h.coeff.float().view(torch.int32).long()[:, None] for h in handles(steering)
              if torch.is_tensor(h.coeff) and h.start < until]
    below, low = first_of_each(prompt)
    above, high = first_of_each(torch.cat([prompt, *coeffs], 1))
    if len(above) == len(tokens) and (site_block == 0 or len(below) == lower_rows):
        return None
    return Distinct(below, low, above, high, low[above])


class SharedRows:
    """Which batch rows each block of a decoder runs on.

    After `declare(n_own, partner_of, split)` batch rows `n_own + j` repeat row `partner_of[j]`
    up to block `split` (base partners of steered rows): blocks below `split` run on the first
    `n_own` rows only and the residual stream is widened to the whole batch when block `split`
    begins. During a prefill of repeated rows `distinct` (a `Distinct`) says instead which rows
    run below and from `site_block`."""

    def __init__(self):
        self.split = 0                 # layers below `split` run on the first `n_own` rows only
        self.n_own: int | None = None
        self.partner_of: Tensor | None = None
        self.site_block = 0            # the first block steered
        self.distinct: Distinct | None = None

    def declare(self, n_own: int, partner_of: Int[Tensor, " partner"], split: int) -> None:
        self.n_own, self.partner_of, self.split = n_own, partner_of, split if len(partner_of) else 0
        self.site_block = split

    def rows(self, i: int) -> int | None:
        """How many batch rows block i runs on (None: all)."""
        return self.n_own if i < self.split else None

    def lower(self, i: int, t: Tensor) -> Tensor:
        """The rows of `t` (one per batch row) that block i runs on."""
        if self.distinct is not None:
            return t[self.distinct.below if i < self.site_block else self.distinct.above]
        return t[:self.rows(i)]

    def widen(self, i: int, resid: Tensor) -> Tensor:
        """The residual stream entering block i, widened to the rows block i runs on."""
        if self.distinct is not None:
            return resid[self.distinct.lift] if i == self.site_block and i > 0 else resid
        if i == self.split and self.split > 0:
            return torch.cat([resid, resid[self.partner_of]])
        return resid

    def widens_after(self, i: int) -> bool:
        """Whether the rows widen after block i (its output is not the next block's input as is)."""
        return i + 1 == (self.site_block if self.distinct is not None else self.split)

    @contextmanager
    def first_only(self, n: int, n_layers: int) -> Iterator[None]:
        """Meanwhile every block runs on the first `n` rows alone (a fork of the steered rows)."""
        kept = (self.n_own, self.split)
        self.n_own, self.split = n, n_layers
        try:
            yield
        finally:
            self.n_own, self.split = kept

    def select(self, rows: Int[Tensor, " keep"], cache: KVCache) -> None:
        """Keep these batch rows, in `cache` too (its layers below the split keep the steered rows
        that stay)."""
        if not self.split:
            cache.select(rows)
            return
        own = rows[rows < self.n_own]
        where = torch.full((self.n_own,), -1, dtype=torch.long, device=rows.device)
        where[own] = torch.arange(len(own), device=rows.device)
        partner_of = where[self.partner_of[rows[rows >= self.n_own] - self.n_own]]
        assert bool((partner_of >= 0).all()), "a partner row outlived the row it repeats"
        cache.select(rows, own, self.split)
        self.n_own, self.partner_of = len(own), partner_of
        if not len(partner_of):       # nothing left to widen: run every block on all rows
            self.split = 0
