"""A local Hugging Face checkpoint directory as TransformerLens sees it: its config (built from
`config.json` by `hf_configs`), its weights converted by TransformerLens's own converter for the
family, and its tokenizer. `loading` builds the model from these; `converted` goes through here
once to convert a GGUF file."""

from pathlib import Path

import torch
from transformer_lens import HookedTransformerConfig

from isokl_tl.models.hf_configs import config_dict, neutral_alias


def load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[HookedTransformerConfig, dict[str, torch.Tensor], object]:
    """The config, TransformerLens state dict (in `dtype`) and tokenizer of the checkpoint at
    `path`, read from local files only."""
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg_dict = config_dict(path)
    cfg_dict["dtype"] = dtype
    cfg_dict["default_prepend_bos"] = False
    cfg = HookedTransformerConfig(**cfg_dict)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    with neutral_alias(path) as alias:
        sd = get_pretrained_state_dict(str(alias), cfg, hf_model=hf, dtype=dtype)
    return cfg, sd, AutoTokenizer.from_pretrained(path, local_files_only=True)
