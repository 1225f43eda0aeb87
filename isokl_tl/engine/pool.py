"""Decoders kept for later rollouts of the same shape.

A reusable decoder (`Decoder.reusable`: the CUDA-graph decoder) holds KV caches, result buffers
and a captured graph. A rollout that ends hands it to `keep` under a key of everything the graph
depends on; a later rollout with the same key `take`s it back, `adopt`s its own steering and
skips the warm-up step and the capture. Kept decoders hold no reference to their model, so
deleting a model frees it and them at once.
"""

import weakref
from collections import OrderedDict

from transformer_lens import HookedTransformer

from isokl_tl.engine.decoder import Decoder

KEEP = 2          # decoders kept per model (each holds its KV caches)

_KEPT: "weakref.WeakKeyDictionary[HookedTransformer, OrderedDict]" = weakref.WeakKeyDictionary()


def _kept(model: HookedTransformer) -> OrderedDict:
    return _KEPT.setdefault(model, OrderedDict())


def take(model: HookedTransformer, key) -> Decoder | None:
    """The decoder kept under `key`, removed from the store (a rollout that fails with it in hand
    thus drops it), or None."""
    decoder = _kept(model).pop(key, None)
    if decoder is not None:
        decoder.model = model
    return decoder


def keep(model: HookedTransformer, key, decoder: Decoder) -> None:
    """Keep `decoder` for a later rollout with the same `key`; the oldest beyond `KEEP` go."""
    kept = _kept(model)
    decoder.model = None
    kept[key] = decoder
    while len(kept) > KEEP:
        kept.popitem(last=False)


def release(model: HookedTransformer) -> None:
    """Drop the decoders (KV caches, CUDA graphs) kept for `model`'s later rollouts."""
    _kept(model).clear()


def kept_count(model: HookedTransformer) -> int:
    return len(_kept(model))
