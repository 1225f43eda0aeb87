"""Read a llama-architecture GGUF file into a TransformerLens config and state dict.

The `gguf` package does the parsing and the dequantisation; this module only maps names and
shapes. llama.cpp's converter permutes the rows of the Q and K projections so that its rotary
kernel can rotate adjacent pairs; TransformerLens (like Hugging Face) rotates the two halves of
each head, so the permutation is undone here.
"""

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformer_lens import HookedTransformerConfig

SUPPORTED_ARCHITECTURES = ("llama",)


def _field(reader: GGUFReader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def _unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute(w, n_head)` on the rows of a Q or K projection."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader: GGUFReader, *, n_ctx: int, dtype: torch.dtype) -> HookedTransformerConfig:
    """Build the HookedTransformerConfig of a llama GGUF by hand (from_pretrained refuses GGUF)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    d_model = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv") or n_heads)
    d_head = d_model // n_heads
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return HookedTransformerConfig(
        d_model=d_model,
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=int(_field(reader, "llama.feed_forward_length")),
        n_layers=int(_field(reader, "llama.block_count")),
        n_ctx=min(n_ctx, int(_field(reader, "llama.context_length") or n_ctx)),
        eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        d_vocab=int(vocab),
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=int(_field(reader, "llama.rope.dimension_count") or d_head),
        rotary_base=float(_field(reader, "llama.rope.freq_base") or 10000.0),
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        dtype=dtype,
    )


def gguf_state_dict(reader: GGUFReader, cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
    """Dequantise every tensor to float32 and name it as HookedTransformer expects."""
    raw = {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}

    def get(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(raw[name], dtype=np.float32))

    n_kv = cfg.n_key_value_heads or cfg.n_heads
    kv = "_" if cfg.n_key_value_heads is not None else ""
    sd: dict[str, torch.Tensor] = {"embed.W_E": get("token_embd.weight")}
    for layer in range(cfg.n_layers):
        p = f"blk.{layer}."
        q = torch.from_numpy(_unpermute_rotary_rows(raw[p + "attn_q.weight"], cfg.n_heads).copy())
        k = torch.from_numpy(_unpermute_rotary_rows(raw[p + "attn_k.weight"], n_kv).copy())
        v = get(p + "attn_v.weight")
        o = get(p + "attn_output.weight")
        b = f"blocks.{layer}."
        sd[b + "ln1.w"] = get(p + "attn_norm.weight")
        sd[b + "ln2.w"] = get(p + "ffn_norm.weight")
        sd[b + "attn.W_Q"] = q.reshape(cfg.n_heads, cfg.d_head, cfg.d_model).transpose(1, 2)
        sd[b + f"attn.{kv}W_K"] = k.reshape(n_kv, cfg.d_head, cfg.d_model).transpose(1, 2)
        sd[b + f"attn.{kv}W_V"] = v.reshape(n_kv, cfg.d_head, cfg.d_model).transpose(1, 2)
        sd[b + "attn.W_O"] = o.reshape(cfg.d_model, cfg.n_heads, cfg.d_head).permute(1, 2, 0)
        sd[b + "attn.b_Q"] = torch.zeros(cfg.n_heads, cfg.d_head)
        sd[b + f"attn.{kv}b_K"] = torch.zeros(n_kv, cfg.d_head)
        sd[b + f"attn.{kv}b_V"] = torch.zeros(n_kv, cfg.d_head)
        sd[b + "attn.b_O"] = torch.zeros(cfg.d_model)
        sd[b + "mlp.W_gate"] = get(p + "ffn_gate.weight").T
        sd[b + "mlp.W_in"] = get(p + "ffn_up.weight").T
        sd[b + "mlp.W_out"] = get(p + "ffn_down.weight").T
        sd[b + "mlp.b_in"] = torch.zeros(cfg.d_mlp)
        sd[b + "mlp.b_out"] = torch.zeros(cfg.d_model)
    sd["ln_final.w"] = get("output_norm.weight")
    unembed = get("output.weight") if "output.weight" in raw else sd["embed.W_E"]  # tied
    sd["unembed.W_U"] = unembed.T
    sd["unembed.b_U"] = torch.zeros(cfg.d_vocab)
    return {k: t.contiguous() for k, t in sd.items()}


def read_gguf(path: Path, *, n_ctx: int, dtype: torch.dtype):
    reader = GGUFReader(str(path))
    cfg = gguf_config(reader, n_ctx=n_ctx, dtype=dtype)
    return cfg, gguf_state_dict(reader, cfg)
