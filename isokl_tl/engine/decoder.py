"""The decoder interface, and the reference decoder (TransformerLens's own forward).

A decoder turns a batch of left-padded prompts into next-token logits, one step at a time:
`prefill(tokens, mask)` runs the prompts and returns the logits at their last position;
`step(next_tokens)` feeds one token per row and returns the next logits; `fork(tail)` runs the same
extra columns after every row's cache and returns the logits at the last of them, leaving the
cache as it was (a side branch: fork pmass read off the rollout's own cache). Steering hooks fire
inside every forward pass; before each pass the decoder sets the steering's `offset` (the
absolute position of the pass's first column), so that "steer generated tokens only" works.

What a decoder can do beyond that is declared on its class, and the decode loop
(`isokl_tl.engine.loop`) reads the declarations, never `hasattr`:

- `shrinks`: finished rows leave the batch (`select`); otherwise the batch keeps its shape, rows
  that finished are masked, and EOS is checked every few steps only.
- `shares_prefix`: base partners can share the blocks below the first steering site with the
  rows they repeat (`share_prefix`).
- `captures_scoring`: `scored_step(score)` runs the step's scoring and the next forward as one
  captured unit (a CUDA graph replay).
- `reusable`: the decoder (its KV cache, graph and buffers) may serve a later rollout of the same
  shape (`isokl_tl.engine.pool`), after `adopt(steering)`.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from isokl_tl.hooks import Steering, SteeringGroup


class Decoder(ABC):
    name: ClassVar[str]
    shrinks: ClassVar[bool] = True
    shares_prefix: ClassVar[bool] = False
    captures_scoring: ClassVar[bool] = False
    reusable: ClassVar[bool] = False

    def __init__(self, model: HookedTransformer, steering: Steering | SteeringGroup | None, capacity: int):
        self.model, self.steering = model, steering
        self.scoring = None          # a reusable decoder keeps its batch's `Scores` with its graph

    @abstractmethod
    def prefill(self, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
                ) -> Float[Tensor, "batch d_vocab"]: ...

    @abstractmethod
    def _forward(self, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
                 ) -> Float[Tensor, "batch d_vocab"]:
        """Run new columns (after the cached ones) through the model; the logits at the last."""

    @torch.no_grad()
    def step(self, tokens: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
        """Feed one token per row; the next logits."""
        return self._forward(tokens[:, None], torch.ones_like(tokens)[:, None])

    @abstractmethod
    def fork(self, tail: Int[Tensor, "rows tail"]) -> Float[Tensor, "rows d_vocab"]:
        """Run `tail` after the cached tokens of the first `len(tail)` batch rows (steered as any
        new columns are) and return the logits at its last column; the cache afterwards is as it
        was before."""

    def select(self, rows: Int[Tensor, " keep"]) -> None:
        """Keep only these batch rows (decoders that `shrink`)."""
        raise NotImplementedError(f"{type(self).__name__} keeps its batch fixed")

    def share_prefix(self, n_own: int, partner_of: Int[Tensor, " partner"], split: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not share prefixes")

    def scored_step(self, score: Callable[[Tensor], Tensor]) -> Float[Tensor, "batch d_vocab"]:
        raise NotImplementedError(f"{type(self).__name__} does not capture scoring")

    def run_hooks_every_step(self) -> None:
        """A hook with Python side effects (a recorder) must run at every step: capture nothing."""

    def adopt(self, steering: Steering | SteeringGroup | None) -> None:
        """Serve a new rollout with `steering` (decoders that are `reusable`)."""
        self.steering = steering

    def select_coeff(self, rows: Tensor) -> None:
        """Keep the per-row steering coefficients of the rows that stay in the batch."""
        if self.steering is not None:
            self.steering.select(rows)


class ReferenceDecoder(Decoder):
    """TransformerLens's own forward with its key-value cache: the reference decode path, and the
    one every architecture and every hook point gets."""

    name = "reference"

    def __init__(self, model: HookedTransformer, steering: Steering | SteeringGroup | None = None,
                 capacity: int | None = None):
        super().__init__(model, steering, capacity or 0)   # TL's cache grows: no capacity needed
        self.cache: TransformerLensKeyValueCache | None = None
        self.length = 0

    def _forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if self.steering is not None:
            self.steering.offset = self.length
        logits = self.model(tokens, attention_mask=mask, past_kv_cache=self.cache)
        self.length += tokens.shape[1]
        return logits[:, -1]

    @torch.no_grad()
    def prefill(self, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
                ) -> Float[Tensor, "batch d_vocab"]:
        self.cache = TransformerLensKeyValueCache.init_cache(
            self.model.cfg, self.model.cfg.device, tokens.shape[0]
        )
        self.length = 0
        return self._forward(tokens, mask)

    @torch.no_grad()
    def fork(self, tail: Int[Tensor, "rows tail"]) -> Float[Tensor, "rows d_vocab"]:
        """Every row forks (the reference keeps it simple); the first `len(tail)` rows' logits."""
        assert self.cache is not None
        n, b = tail.shape[0], self.cache.previous_attention_mask.shape[0]
        tail = torch.cat([tail, tail[:1].expand(b - n, -1)])     # the other rows' logits are not read
        kept = [(e.past_keys, e.past_values) for e in self.cache.entries]
        mask, length = self.cache.previous_attention_mask, self.length
        try:
            return self._forward(tail, torch.ones_like(tail))[:n]
        finally:                      # TransformerLens's cache concatenates: the old tensors are the old cache
            for e, (k, v) in zip(self.cache.entries, kept):
                e.past_keys, e.past_values = k, v
            self.cache.previous_attention_mask, self.length = mask, length

    def select(self, rows: Int[Tensor, " keep"]) -> None:
        assert self.cache is not None
        for entry in self.cache.entries:
            entry.past_keys = entry.past_keys[rows]
            entry.past_values = entry.past_values[rows]
        self.cache.previous_attention_mask = self.cache.previous_attention_mask[rows]
        self.select_coeff(rows)
