"""`HookedTransformerConfig` fields for a local Hugging Face checkpoint, from its `config.json`.

TransformerLens 3.9 converts the weights of every family here, but its config converter has three
gaps for local checkpoints: it builds Gemma 1/2/3 configs only from the official model names; it
reads the family from the *name* when the name contains `llama` or `gemma`, so a directory called
`my-llama` loses its config; and some of its branches read fields that transformers 5 renamed
(GPT-2's `n_ctx`, Phi's `partial_rotary_factor`). So: the families whose branch cannot work get a
builder here, one function each, setting the fields TransformerLens's own config for that family
sets; every other family goes through TransformerLens's converter, called on a link to the
checkpoint under a name that holds no family name.
"""

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MIXTURE_OF_EXPERTS = ("MixtralForCausalLM", "OlmoeForCausalLM", "GptOssForCausalLM", "Qwen2MoeForCausalLM",
                      "Qwen3MoeForCausalLM")
NOT_DECODERS = ("BertForMaskedLM", "T5ForConditionalGeneration", "HubertModel", "HubertForCTC")


def _rope_theta(hf, layer_type: str | None = None) -> float:
    """The rotary base, wherever this transformers version keeps it (per layer type for Gemma 3)."""
    params = getattr(hf, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(hf, "rope_theta", None) or 10000.0)


def _kv_heads(hf) -> int | None:
    kv = getattr(hf, "num_key_value_heads", None)
    return kv if kv and kv != hf.num_attention_heads else None


def _head_dim(hf) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def gpt2(hf) -> dict:
    return {"d_model": hf.n_embd, "d_head": hf.n_embd // hf.n_head, "n_heads": hf.n_head,
            "d_mlp": hf.n_inner or 4 * hf.n_embd, "n_layers": hf.n_layer, "n_ctx": hf.n_positions,
            "eps": hf.layer_norm_epsilon, "d_vocab": hf.vocab_size, "act_fn": hf.activation_function,
            "use_attn_scale": getattr(hf, "scale_attn_weights", True), "use_local_attn": False,
            "scale_attn_by_inverse_layer_idx": hf.scale_attn_by_inverse_layer_idx, "normalization_type": "LN"}


def phi(hf) -> dict:
    d_head = hf.hidden_size // hf.num_attention_heads
    factor = (getattr(hf, "rope_parameters", None) or {}).get("partial_rotary_factor") \
        or getattr(hf, "partial_rotary_factor", None) or 1.0
    return {"d_model": hf.hidden_size, "d_head": d_head, "n_heads": hf.num_attention_heads,
            "d_mlp": hf.intermediate_size, "n_layers": hf.num_hidden_layers, "n_ctx": hf.max_position_embeddings,
            "eps": hf.layer_norm_eps, "d_vocab": hf.vocab_size, "act_fn": hf.hidden_act,
            "initializer_range": hf.initializer_range, "normalization_type": "LN",
            "positional_embedding_type": "rotary", "rotary_base": _rope_theta(hf), "use_attn_scale": True,
            "parallel_attn_mlp": True, "rotary_dim": round(factor * d_head)}


def _gemma_common(hf) -> dict:
    return {"d_model": hf.hidden_size, "d_head": _head_dim(hf), "n_heads": hf.num_attention_heads,
            "d_mlp": hf.intermediate_size, "n_layers": hf.num_hidden_layers, "n_ctx": hf.max_position_embeddings,
            "eps": hf.rms_norm_eps, "d_vocab": hf.vocab_size,
            "act_fn": getattr(hf, "hidden_activation", None) or hf.hidden_act,
            "initializer_range": hf.initializer_range, "normalization_type": "RMS",
            "positional_embedding_type": "rotary", "rotary_dim": _head_dim(hf), "rotary_base": _rope_theta(hf),
            "use_attn_scale": True, "n_key_value_heads": _kv_heads(hf), "gated_mlp": True, "final_rms": True}


def gemma(hf) -> dict:
    return _gemma_common(hf)


def _windows(hf) -> list[str]:
    """Per layer: `local` (sliding window) or `global`, as the checkpoint says."""
    types = getattr(hf, "layer_types", None)
    if types:
        return ["local" if t == "sliding_attention" else "global" for t in types]
    return ["local" if i % 2 == 0 else "global" for i in range(hf.num_hidden_layers)]   # Gemma 2's rule


def gemma2(hf) -> dict:
    return {**_gemma_common(hf), "attn_scale": float(hf.query_pre_attn_scalar) ** 0.5,
            "window_size": hf.sliding_window, "use_local_attn": True, "attn_types": _windows(hf),
            "attn_scores_soft_cap": hf.attn_logit_softcapping or -1.0,
            "output_logits_soft_cap": hf.final_logit_softcapping or -1.0,
            "use_normalization_before_and_after": True}


def gemma3(hf) -> dict:
    out = {**_gemma_common(hf), "attn_scale": float(hf.query_pre_attn_scalar) ** 0.5,
           "window_size": hf.sliding_window, "use_local_attn": True, "attn_types": _windows(hf),
           "rotary_base": _rope_theta(hf, "full_attention"),
           "rotary_base_local": _rope_theta(hf, "sliding_attention"),
           "use_normalization_before_and_after": True, "use_qk_norm": True}
    full = (getattr(hf, "rope_parameters", None) or {}).get("full_attention") or {}
    if full.get("rope_type") == "linear":     # Gemma 3 4B+: the global layers' positions scaled
        out["rotary_scaling_factor"] = float(full["factor"])
    if hf.attn_logit_softcapping:
        out["attn_scores_soft_cap"] = hf.attn_logit_softcapping
    if hf.final_logit_softcapping:
        out["output_logits_soft_cap"] = hf.final_logit_softcapping
    return out


def olmo(hf) -> dict:
    return {"d_model": hf.hidden_size, "d_head": _head_dim(hf), "n_heads": hf.num_attention_heads,
            "d_mlp": hf.intermediate_size, "n_layers": hf.num_hidden_layers, "n_ctx": hf.max_position_embeddings,
            "eps": 1e-5, "d_vocab": hf.vocab_size, "act_fn": hf.hidden_act,
            "initializer_range": hf.initializer_range, "normalization_type": "LN",
            "positional_embedding_type": "rotary", "rotary_dim": _head_dim(hf), "rotary_base": _rope_theta(hf),
            "n_key_value_heads": _kv_heads(hf), "gated_mlp": True, "final_rms": False,
            "tie_word_embeddings": bool(hf.tie_word_embeddings)}


def olmo2(hf) -> dict:
    return {"d_model": hf.hidden_size, "d_head": _head_dim(hf), "n_heads": hf.num_attention_heads,
            "d_mlp": hf.intermediate_size, "n_layers": hf.num_hidden_layers, "n_ctx": hf.max_position_embeddings,
            "eps": hf.rms_norm_eps, "d_vocab": hf.vocab_size, "act_fn": hf.hidden_act,
            "initializer_range": hf.initializer_range, "normalization_type": "RMS",
            "positional_embedding_type": "rotary", "rotary_dim": _head_dim(hf), "rotary_base": _rope_theta(hf),
            "attn_types": ["global"] * hf.num_hidden_layers, "gated_mlp": True, "n_key_value_heads": _kv_heads(hf),
            "tie_word_embeddings": bool(hf.tie_word_embeddings)}


BUILDERS = {"GPT2LMHeadModel": gpt2, "PhiForCausalLM": phi, "GemmaForCausalLM": gemma,
            "Gemma2ForCausalLM": gemma2, "Gemma3ForCausalLM": gemma3, "OlmoForCausalLM": olmo,
            "Olmo2ForCausalLM": olmo2}

_NAMES_TL_READS = re.compile(r"llama|gemma|phi|mistral|qwen|olmo|gpt|opt|pythia|neox|bloom|santacoder|stablelm",
                             re.IGNORECASE)


@contextmanager
def neutral_alias(path: Path) -> Iterator[Path]:
    """A temporary directory of links to `path`'s files, under a name that names no model family
    (TransformerLens picks config branches by substrings of the name)."""
    for _ in range(20):
        tmp = tempfile.mkdtemp(prefix="isokl-")
        if not _NAMES_TL_READS.search(tmp):
            break
        os.rmdir(tmp)
    alias = Path(tmp) / "checkpoint"
    alias.mkdir()
    try:
        for f in Path(path).resolve().iterdir():
            (alias / f.name).symlink_to(f)
        yield alias
    finally:
        for f in alias.iterdir():
            f.unlink()
        alias.rmdir()
        os.rmdir(tmp)


# rope scalings TransformerLens 3.9 applies, per architecture; any other would be dropped silently
ROPE_SCALINGS = {"LlamaForCausalLM": {"llama3"}, "Olmo3ForCausalLM": {"yarn"}, "Gemma3ForCausalLM": {"linear"}}


def rope_scalings(hf) -> set[str]:
    """The rope scaling types a transformers config asks for (per layer type where it has them)."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    dicts = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    return {d.get("rope_type") or d.get("type") for d in dicts if d} - {None, "default"}


def config_dict(path: Path) -> dict:
    """`HookedTransformerConfig` fields for the local checkpoint at `path` (see the module
    docstring); `original_architecture` and `tokenizer_name` included."""
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(hf, "architectures", None) or [type(hf).__name__])[0]
    if arch in MIXTURE_OF_EXPERTS:
        raise ValueError(f"checkpoint {str(path)!r} is a mixture of experts ({arch}); isokl-tl steers dense "
                         "decoder-only models")
    if arch in NOT_DECODERS:
        raise ValueError(f"checkpoint {str(path)!r} is not a decoder-only language model ({arch})")
    unapplied = rope_scalings(hf) - ROPE_SCALINGS.get(arch, set())
    if unapplied:
        raise ValueError(f"checkpoint {str(path)!r} ({arch}) uses {', '.join(sorted(unapplied))} rope scaling, which "
                         "TransformerLens 3.9 does not apply to this architecture: its logits would be wrong")
    if arch in BUILDERS:
        out = BUILDERS[arch](hf)
    else:
        try:
            with neutral_alias(path) as alias:
                out = convert_hf_model_config(str(alias))
        except NotImplementedError as e:
            raise ValueError(f"checkpoint {str(path)!r}: {e} (by TransformerLens 3.9's converter)") from None
    return {**out, "original_architecture": arch, "tokenizer_name": str(path)}
