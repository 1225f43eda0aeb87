"""Models: every spec `load_model` accepts, loaded as a `HookedTransformer` with its tokenizer.

`loading` resolves a spec (the embedded SmolLM2 GGUF, the optional Gemma 3 270M GGUF, the tiny
test model, a `.gguf` file, a local Hugging Face checkpoint, a TransformerLens name); `gguf` reads a
GGUF file as a Hugging Face checkpoint; `converted` keeps a GGUF file's converted weights in the
cache (converted once, through `hf_dir`, which reads a local checkpoint's config, weights and
tokenizer); `hf_configs` builds TransformerLens configs from `config.json`; `tiny` builds the
seeded random test model and its tokenizer; `checkpoints` writes random-init checkpoints and GGUF
files of every family (tests, benchmarks).
"""

from isokl_tl.models.converted import cache_dir
from isokl_tl.models.loading import (
                                     DTYPES,
                                     EMBEDDED,
                                     GEMMA3,
                                     MODEL_SPECS,
                                     TINY,
                                     check_spec,
                                     embedded_gguf_path,
                                     load_model,
                                     parse_dtype,
)

__all__ = ["DTYPES", "EMBEDDED", "GEMMA3", "MODEL_SPECS", "TINY", "cache_dir", "check_spec", "embedded_gguf_path",
           "load_model", "parse_dtype"]
