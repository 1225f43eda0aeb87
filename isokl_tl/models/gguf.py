"""Read a GGUF file as a Hugging Face checkpoint: its `config.json` fields and its state dict.

The `gguf` package parses the file and dequantises each tensor to float32; this module maps
llama.cpp's names, metadata and conventions back to those of `transformers`, one architecture at a
time, so that the checkpoint then loads like any local Hugging Face checkpoint
(`models.hf_dir`). The conventions undone here:

- llama: the converter permutes the rows of the Q and K projections so that its rotary kernel can
  rotate adjacent pairs; Hugging Face rotates the two halves of each head. Llama 3.1+ files keep
  their rope scaling as a `rope_freqs` tensor (one divisor per frequency) rather than as metadata;
  it is read back as Llama 3 scaling and checked against the divisors it implies.
- qwen2, qwen3: no permutation (their rotary already rotates halves); Qwen2 has Q/K/V biases,
  Qwen3 a per-head QK norm.
- gemma2, gemma3: the converter stores every RMSNorm weight as `1 + w` (Gemma computes
  `x * (1 + w)`), so 1 is subtracted. What the file does not say is what llama.cpp's own graph
  assumes: queries scaled by `1/sqrt(head_dim)` (`1/sqrt(d_model / n_heads)` for the 27B models);
  Gemma 2's soft caps of 50 and 30 unless stated; Gemma 3's every sixth layer global, the rest
  sliding-window layers with rotary base 10,000.
"""

from pathlib import Path

import numpy as np
import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
_HF_CLASS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
             "qwen3": ("Qwen3ForCausalLM", "qwen3"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
             "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}
_GEMMA3_GLOBAL_EVERY = 6
_GEMMA3_LOCAL_BASE = 10000.0
_LARGEST_GEMMA_LAYERS = {"gemma2": 46, "gemma3": 62}    # the 27B models, which scale queries by d_model / n_heads


class _Metadata:
    """The file's key/value fields under its architecture's prefix."""

    def __init__(self, reader, arch: str):
        self.reader, self.arch = reader, arch

    def get(self, key: str, default=None):
        field = self.reader.fields.get(f"{self.arch}.{key}") or self.reader.fields.get(key)
        return default if field is None else field.contents()


def _unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute(w, n_head)` on the rows of a Q or K projection (or bias)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_divisors(base: float, dim: int, factor: float, low: float, high: float, original: float) -> np.ndarray:
    """The per-frequency divisors Llama 3 rope scaling applies (as llama.cpp's converter stores them)."""
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, divisor))


def _llama3_scaling(divisors: np.ndarray, base: float, dim: int) -> dict:
    """Llama 3 rope scaling parameters that reproduce a `rope_freqs` tensor, or an error.

    The divisors are 1 at high frequencies, `factor` at low ones and `1 / ((1 - s)/factor + s)`
    between, with `s` linear in the frequency: `s = original / (wavelength * (high - low)) -
    low / (high - low)`. Only the two coefficients of that line matter (the band's edges are
    where s is 0 and 1), so low_freq_factor is set to 1, as in every Llama 3 release, and the
    other two read off the band."""
    factor = float(divisors.max())
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    wavelen = 2 * np.pi * base ** (np.arange(0, dim, 2) / dim)
    band = (divisors > 1 + 1e-6) & (divisors < factor - 1e-6)
    s = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor) if factor > 1 else np.zeros(0)
    if band.sum() >= 2:          # the line through the band
        slope, intercept = np.polyfit(1 / wavelen[band], s, 1)
        if intercept < 0 < slope:
            high = 1.0 - 1.0 / intercept
            params.update(high_freq_factor=round(float(high), 6),
                          original_max_position_embeddings=round(float(slope * (high - 1.0)), 6))
    elif band.sum() == 1:        # one point: high_freq_factor 4, as released
        params["original_max_position_embeddings"] = round(float(wavelen[band][0] * (3 * s[0] + 1)), 6)
    elif factor > 1:             # no band: any length between the unscaled and the scaled wavelengths
        lo, hi = 4 * wavelen[divisors <= 1 + 1e-6].max(initial=0.0), wavelen[divisors >= factor - 1e-6].min()
        if not lo < 8192 < hi:
            params["original_max_position_embeddings"] = float(np.sqrt(max(lo, 1.0) * hi))
    for key in ("high_freq_factor", "original_max_position_embeddings"):     # float noise off released values
        params[key] = float(round(params[key])) if abs(params[key] - round(params[key])) < 1e-4 * params[key] \
            else params[key]
    expected = _llama3_divisors(base, dim, factor, params["low_freq_factor"], params["high_freq_factor"],
                                params["original_max_position_embeddings"])
    if not np.allclose(expected, divisors, rtol=1e-4):
        raise ValueError("this GGUF's rope_freqs tensor is not Llama 3 rope scaling; load the Hugging Face "
                         "checkpoint instead")
    return params


def hf_config(reader, arch: str, tensor_names: set[str]) -> dict:
    """The `config.json` of the checkpoint this GGUF was converted from, as far as loading needs."""
    m = _Metadata(reader, arch)
    missing = [k for k in ("attention.head_count", "embedding_length", "block_count", "feed_forward_length",
                           "attention.layer_norm_rms_epsilon") if m.get(k) is None]
    if missing:
        raise ValueError(f"GGUF file lacks {', '.join(f'{arch}.{k}' for k in missing)}: not a complete {arch} model")
    n_heads = int(m.get("attention.head_count"))
    d_model = int(m.get("embedding_length"))
    head_dim = int(m.get("attention.key_length") or m.get("rope.dimension_count") or d_model // n_heads)
    n_layers = int(m.get("block_count"))
    vocab = m.get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    cls, model_type = _HF_CLASS[arch]
    cfg = {"architectures": [cls], "model_type": model_type, "hidden_size": d_model,
           "intermediate_size": int(m.get("feed_forward_length")), "num_hidden_layers": n_layers,
           "num_attention_heads": n_heads, "num_key_value_heads": int(m.get("attention.head_count_kv") or n_heads),
           "head_dim": head_dim, "rms_norm_eps": float(m.get("attention.layer_norm_rms_epsilon")),
           "max_position_embeddings": int(m.get("context_length") or 8192), "vocab_size": int(vocab),
           "tie_word_embeddings": "output.weight" not in tensor_names,
           "bos_token_id": m.get("tokenizer.ggml.bos_token_id"), "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
           "pad_token_id": m.get("tokenizer.ggml.padding_token_id")}
    theta = float(m.get("rope.freq_base") or 10000.0)
    if arch in ("llama", "qwen2", "qwen3"):
        cfg.update(rope_theta=theta, hidden_act="silu", attention_bias=arch == "qwen2")
        if "rope_freqs.weight" in tensor_names:
            freqs = _tensor(reader, "rope_freqs.weight")
            cfg["rope_scaling"] = _llama3_scaling(freqs, theta, head_dim)
        elif m.get("rope.scaling.type") not in (None, "none"):     # (loading refuses what TransformerLens drops)
            cfg["rope_scaling"] = {"rope_type": m.get("rope.scaling.type"),
                                   "factor": float(m.get("rope.scaling.factor") or 1.0)}
        if arch == "qwen2":
            cfg["use_sliding_window"] = False
        return cfg
    scale = d_model // n_heads if n_layers == _LARGEST_GEMMA_LAYERS[arch] else head_dim
    cfg.update(query_pre_attn_scalar=scale, sliding_window=int(m.get("attention.sliding_window") or 4096),
               hidden_activation="gelu_pytorch_tanh")
    if arch == "gemma2":
        cfg.update(rope_theta=theta, attn_logit_softcapping=float(m.get("attn_logit_softcapping") or 50.0),
                   final_logit_softcapping=float(m.get("final_logit_softcapping") or 30.0))
        return cfg
    every = m.get("attention.sliding_window_pattern") or _GEMMA3_GLOBAL_EVERY
    if not isinstance(every, int | float):
        raise ValueError(f"GGUF gemma3.attention.sliding_window_pattern {every!r}: only a period is supported")
    every = int(every)
    full = {"rope_type": "default", "rope_theta": theta}
    if m.get("rope.scaling.type") not in (None, "none"):
        full = {"rope_type": m.get("rope.scaling.type"), "rope_theta": theta,
                "factor": float(m.get("rope.scaling.factor") or 1.0)}
    cfg.update(layer_types=["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)],
               rope_parameters={"full_attention": full, "sliding_attention": {
                   "rope_type": "default", "rope_theta": float(m.get("rope.freq_base_swa") or _GEMMA3_LOCAL_BASE)}},
               attn_logit_softcapping=None, final_logit_softcapping=None)
    return cfg


# llama.cpp's tensor names -> transformers' (per layer, after "blk.N." / "model.layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_NORM_AFTER_ATTENTION = {  # llama-style blocks have two norms; Gemma 2/3 blocks four
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "gemma": {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
              "post_ffw_norm": "post_feedforward_layernorm"},
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _dequantized(t) -> np.ndarray:
    """One GGUF tensor as float32 (a writable copy)."""
    from gguf.quants import dequantize

    return np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)


def _tensor(reader, name: str) -> np.ndarray:
    return _dequantized(next(t for t in reader.tensors if t.name == name))


def hf_state_dict(reader, arch: str, cfg: dict) -> dict[str, torch.Tensor]:
    """Every tensor dequantised to float32 under its `transformers` name, conventions undone."""
    gemma = arch.startswith("gemma")
    layer_names = {**_LAYER_NAMES, **_NORM_AFTER_ATTENTION["gemma" if gemma else "llama"]}
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":          # read into the config
            continue
        w = _dequantized(t)
        stem, kind = t.name.rsplit(".", 1)
        if stem.startswith("blk."):
            _, layer, part = stem.split(".", 2)
            if part not in layer_names:
                raise ValueError(f"GGUF tensor {t.name!r} has no place in a {arch} model")
            name = f"model.layers.{layer}.{layer_names[part]}.{kind}"
            if arch == "llama" and part in ("attn_q", "attn_k"):
                heads = cfg["num_attention_heads"] if part == "attn_q" else cfg["num_key_value_heads"]
                w = _unpermute_rotary_rows(w, heads)
        elif stem in _TOP_NAMES:
            name = f"{_TOP_NAMES[stem]}.{kind}"
        else:
            raise ValueError(f"GGUF tensor {t.name!r} has no place in a {arch} model")
        if gemma and stem.endswith("norm"):
            w = w - 1.0
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json fields, state dict) of the Hugging Face checkpoint a GGUF file holds."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} of {str(path)!r} is not supported; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    cfg = hf_config(reader, arch, {t.name for t in reader.tensors})
    return cfg, hf_state_dict(reader, arch, cfg)
