"""Which decoder a model gets: the fastest exact one its architecture and hooks allow."""

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from isokl_tl.engine.decoder import Decoder, ReferenceDecoder
from isokl_tl.engine.coverage import unsupported_reason
from isokl_tl.engine.fast import FastDecoder
from isokl_tl.engine.graph import GraphDecoder
from isokl_tl.hooks import Steering, SteeringGroup


@dataclass(frozen=True)
class DecodePath:
    """The decoder class a model gets, and why it gets the reference path (None when fast)."""

    decoder: type[Decoder]
    reason: str | None

    @property
    def name(self) -> str:
        return self.decoder.name


def decode_path(model: HookedTransformer) -> DecodePath:
    """On CUDA the fixed-shape step replayed as a CUDA graph, on CPU the static-cache fast path,
    and TransformerLens's own forward for architectures or hooks the fast paths do not cover."""
    reason = unsupported_reason(model)
    if reason is not None:
        return DecodePath(ReferenceDecoder, reason)
    if torch.device(model.cfg.device).type == "cuda":
        return DecodePath(GraphDecoder, None)
    return DecodePath(FastDecoder, None)


def make_decoder(model: HookedTransformer, steering: Steering | SteeringGroup | None, capacity: int) -> Decoder:
    """A decoder of `decode_path(model)` for a batch steered by `steering`, with room for
    `capacity` tokens per row."""
    return decode_path(model).decoder(model, steering, capacity)
