"""Models: every spec `load_model` accepts, loaded as a `HookedTransformer` with its tokenizer.

`loading` resolves a spec (the embedded SmolLM2 GGUF, the tiny test model, a `.gguf` file, a local
Hugging Face checkpoint, a TransformerLens name); `gguf` reads GGUF weights; `tiny` builds the
seeded random test model and its tokenizer.
"""

from isokl_tl.models.loading import DTYPES, EMBEDDED, MODEL_SPECS, TINY, cache_dir, check_spec, load_model, parse_dtype

__all__ = ["DTYPES", "EMBEDDED", "MODEL_SPECS", "TINY", "cache_dir", "check_spec", "load_model", "parse_dtype"]
