"""Random-init local Hugging Face checkpoints of every decoder family, made offline.

`make_checkpoint(family, where)` builds a small `transformers` model of that family from its config
class, saves it with the tiny BPE tokenizer (`models.tiny`), and returns the directory: what a
user's local checkpoint looks like, with no download. Tests load these to check each family
against `transformers`' own logits; `benchmarks/` builds full-size shapes the same way.
"""

from pathlib import Path

import torch

# family -> (transformers config class, model class, small config fields)
_SMALL = dict(max_position_embeddings=256)


def _small(**fields) -> dict:
    """A small decoder's fields (d_model 64, 2 layers, 4 heads, 256 positions) and `fields`."""
    return {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            **_SMALL, **fields}
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                     window_size=8, **_SMALL)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      rotary_pct=0.25, **_SMALL)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                 **_SMALL)),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              _small(num_key_value_heads=2)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               _small(num_key_value_heads=2, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                _small(num_key_value_heads=2, sliding_window=None)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM",
                       _small(num_key_value_heads=2, sliding_window=6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              _small(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              _small(num_key_value_heads=2, head_dim=16)),
    "phi": ("PhiConfig", "PhiForCausalLM",
            _small(partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             _small(num_key_value_heads=4)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              _small(num_key_value_heads=1, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               _small(num_key_value_heads=2, head_dim=16, sliding_window=8,
                      query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               _small(num_hidden_layers=3, num_key_value_heads=2, head_dim=16, sliding_window=8,
                      query_pre_attn_scalar=16,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "olmo": ("OlmoConfig", "OlmoForCausalLM",
             _small()),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM",
              _small(num_hidden_layers=3, num_key_value_heads=4, initializer_range=0.2)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM",
              _small(num_hidden_layers=4, num_key_value_heads=4, sliding_window=8, initializer_range=0.2,
                     rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                      "full_attention": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0,
                                                         "original_max_position_embeddings": 32,
                                                         "attention_factor": 1.2}})),
}


# Full-size shapes of released models (random weights), for benchmarks: `make_checkpoint(family,
# where, **fields)` with the family and fields of one of these.
SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(family="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True),
    "smollm2-135m": dict(family="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, rope_theta=1e5, tie_word_embeddings=True),
    "qwen3-0.6b": dict(family="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       rope_theta=1e6, tie_word_embeddings=True),
    "llama-3.2-1b": dict(family="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         tie_word_embeddings=True),
    "gemma-2-2b": dict(family="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                       sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, tie_word_embeddings=True),
    "gpt2-small": dict(family="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, tie_word_embeddings=True),
    "pythia-410m": dict(family="gpt_neox", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                        num_attention_heads=16, rotary_pct=0.25, vocab_size=50304, use_parallel_residual=True,
                        tie_word_embeddings=False),
    "gemma-3-1b": dict(family="gemma3", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                       sliding_window=512, query_pre_attn_scalar=256,
                       layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
                       rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                       tie_word_embeddings=True),
    "olmo2-1b": dict(family="olmo2", hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                     vocab_size=100352, rope_theta=5e5, tie_word_embeddings=False),
}


def make_checkpoint(family: str, where: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **fields) -> Path:
    """Save a random-init `family` model (small unless `fields` say otherwise), in `dtype`, and
    the tiny tokenizer into `where`; returns `where`."""
    import transformers

    from isokl_tl.models.tiny import tiny_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    config_cls, model_cls, small = FAMILIES[family]
    tok = tiny_tokenizer()
    cfg = getattr(transformers, config_cls)(**{**small, "vocab_size": len(tok), "eos_token_id": None,
                                               "pad_token_id": None, "bos_token_id": None, **fields})
    cfg.architectures = [model_cls]
    torch.manual_seed(seed)
    where = Path(where)
    getattr(transformers, model_cls)(cfg).to(dtype).eval().save_pretrained(where)
    tok.save_pretrained(where)
    return where


# GGUF files of these architectures, from the family of the same name: what llama.cpp's converter
# writes (its names, metadata and conventions), so that tests can load one with no download.
GGUF_FAMILIES = {"llama": "llama", "llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                 "gemma3": "gemma3"}
_GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                     "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm"}
_GGUF_NORMS = {"llama": {"post_attention_layernorm": "ffn_norm"},
               "gemma": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                         "post_feedforward_layernorm": "post_ffw_norm"}}


def make_gguf(family: str, where: str | Path, *, seed: int = 0, quantize: bool = True, **fields) -> Path:
    """Write a random-init `family` model (see `make_checkpoint`) as the GGUF file llama.cpp's
    converter would: llama's Q/K rows permuted, Gemma's norm weights stored as 1 + w, matrices in
    Q8_0 when `quantize` (so reading it dequantises), the tiny tokenizer as a GPT-2 BPE vocabulary.
    Returns the file's path."""
    import json
    import tempfile

    import gguf
    import numpy as np
    from gguf.quants import quantize as to_q8
    from safetensors.torch import load_file
    from transformers import AutoConfig

    arch = GGUF_FAMILIES[family]
    gemma = arch.startswith("gemma")
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(family, tmp, seed=seed, **fields)
        hf = AutoConfig.from_pretrained(tmp)
        sd = {k: v.numpy() for k, v in load_file(str(Path(tmp) / "model.safetensors")).items()}
        vocab = json.loads((Path(tmp) / "tokenizer.json").read_text())["model"]
    where = Path(where)
    where.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(where), arch)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    w.add_block_count(hf.num_hidden_layers)
    w.add_context_length(hf.max_position_embeddings)
    w.add_embedding_length(hf.hidden_size)
    w.add_feed_forward_length(hf.intermediate_size)
    w.add_head_count(hf.num_attention_heads)
    w.add_head_count_kv(hf.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(hf.rms_norm_eps)
    rope = hf.rope_parameters.get("full_attention", hf.rope_parameters) if gemma else hf.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if gemma:
        w.add_sliding_window(hf.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(hf.attn_logit_softcapping)
        w.add_final_logit_softcapping(hf.final_logit_softcapping)
    if rope.get("rope_type") == "llama3":       # llama.cpp keeps Llama 3 scaling as per-frequency divisors
        from isokl_tl.models.gguf import _llama3_divisors
        divisors = _llama3_divisors(*(float(rope[k]) for k in ("rope_theta",)), head_dim,
                                    *(float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                               "original_max_position_embeddings")))
        w.add_tensor("rope_freqs.weight", divisors.astype(np.float32))
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))     # Gemma's tokenizer converter asks for one
    w.add_token_scores([0.0] * len(tokens))
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer_names = {**_GGUF_LAYER_NAMES, **_GGUF_NORMS["gemma" if gemma else "llama"]}
    for name, t in sd.items():
        stem, kind = name.rsplit(".", 1)
        if stem == "lm_head" and hf.tie_word_embeddings:
            continue
        if stem.startswith("model.layers."):
            _, _, layer, part = stem.split(".", 3)
            gname = f"blk.{layer}.{layer_names[part]}"
            if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = hf.num_attention_heads if part == "self_attn.q_proj" else hf.num_key_value_heads
                t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        else:
            gname = top[stem]
        if gemma and gname.endswith("norm"):
            t = t + 1.0
        t = np.ascontiguousarray(t, dtype=np.float32)
        if quantize and t.ndim == 2 and t.shape[1] % 32 == 0:
            w.add_tensor(f"{gname}.{kind}", to_q8(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(f"{gname}.{kind}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return where
