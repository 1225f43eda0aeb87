"""The engine: everything that turns a model plus steering into tokens and per-token scores.

The science (`isokl_tl.rollout`, `calibrate`, ...) uses the names exported here and nothing else
of the engine; the engine imports only the shared ground floor of the package (`isokl_tl.hooks`
for steering, `isokl_tl.tokens` for padding), never the science.

- `decoder`: the `Decoder` interface with its declared capabilities, and `ReferenceDecoder`
  (TransformerLens's own forward); `fast` (`FastDecoder`: static `KVCache`, SDPA, fused block
  arithmetic from `sublayers`; `distinct`: the rows a prefill can share) and `graph` (`GraphDecoder`:
  fixed-shape steps replayed as CUDA graphs);
  `paths` picks one per model.
- `loop`: the one decode loop (`decode_batch`); `scoring`: per-step choice, KL and records;
  `pool`: decoders kept for later batches of the same shape; `batching`: how many rows a batch
  takes when the caller does not say.
- `fusion`, `cpu_linear`, `layout`: joined projections, oneDNN-packed CPU multiplies, and the
  weight layout the decoders read; `kernels/`: the Triton kernels (CUDA, or Triton's interpreter).
"""

from isokl_tl.engine.batching import batch_rows
from isokl_tl.engine.decoder import Decoder, ReferenceDecoder
from isokl_tl.engine.coverage import unsupported_reason
from isokl_tl.engine.fast import FastDecoder
from isokl_tl.engine.fusion import has_hook
from isokl_tl.engine.graph import GraphDecoder
from isokl_tl.engine.kv_cache import KVCache
from isokl_tl.engine.layout import relayout_for_decode
from isokl_tl.engine.loop import DecoderFactory, Forks, Observer, decode_batch
from isokl_tl.engine.paths import DecodePath, decode_path, make_decoder
from isokl_tl.engine.pool import release
from isokl_tl.engine.scoring import GREEDY, Sampling, kl_from_logprobs

__all__ = ["Decoder", "DecoderFactory", "DecodePath", "FastDecoder", "Forks", "GREEDY", "GraphDecoder", "KVCache",
           "Observer", "ReferenceDecoder", "Sampling", "batch_rows", "decode_batch", "decode_path", "has_hook",
           "kl_from_logprobs", "make_decoder", "relayout_for_decode", "release", "unsupported_reason"]
