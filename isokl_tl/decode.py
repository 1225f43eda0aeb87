"""One step of autoregressive decoding, behind a small interface.

`Decoder.prefill(tokens, mask)` runs the (left-padded) prompts and returns the logits at the last
position; `Decoder.step(next_tokens)` feeds one token per row and returns the next logits. The
rollout engine only talks to this interface, so a faster decode path (static KV cache, CUDA graphs)
can replace `TLDecoder` without touching callers. Steering hooks fire inside every forward pass.
"""

from typing import Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from isokl_tl.hooks import Steering, SteeringGroup


class Decoder(Protocol):
    def prefill(self, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
                ) -> Float[Tensor, "batch d_vocab"]: ...

    def step(self, tokens: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]: ...

    def select(self, rows: Int[Tensor, " keep"]) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""


class OneTokenStep:
    """`step` for decoders whose `_forward(tokens, mask)` runs new columns through the model."""

    @torch.no_grad()
    def step(self, tokens: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
        return self._forward(tokens[:, None], torch.ones_like(tokens)[:, None])


class TLDecoder(OneTokenStep):
    """TransformerLens's own forward with its key-value cache (the reference decode path)."""

    def __init__(self, model: HookedTransformer, steering: Steering | SteeringGroup | None = None,
                 capacity: int | None = None):
        self.model, self.steering = model, steering   # the TL cache grows: capacity is unused
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

    def select(self, rows: Int[Tensor, " keep"]) -> None:
        assert self.cache is not None
        for entry in self.cache.entries:
            entry.past_keys = entry.past_keys[rows]
            entry.past_values = entry.past_values[rows]
        self.cache.previous_attention_mask = self.cache.previous_attention_mask[rows]
        select_coeff(self.steering, rows)


def select_coeff(steering: Steering | SteeringGroup | None, rows: Tensor) -> None:
    """Keep the per-row coefficients of the rows that stay in the batch."""
    if steering is not None:
        steering.select(rows)
