"""GGUF files of every architecture `models.gguf` reads (written offline the way llama.cpp's
converter writes them: its names, Q/K permutation, Gemma's 1 + w norms, Q8_0 matrices) load and
match `transformers`' own GGUF loader, and decode on the fast path."""

from pathlib import Path

import numpy as np
import pytest
import torch

from isokl_tl.engine import decode_path
from isokl_tl.models import load_model
from isokl_tl.models.checkpoints import GGUF_FAMILIES, make_checkpoint, make_gguf

# transformers' GGUF loader reads only the fields real releases vary, and takes the rest from its
# config defaults: so the tiny files use those defaults (Qwen3's and Gemma's 128- and 256-wide heads,
# Gemma 2's soft caps, Gemma 3's five local layers to one global)
_AS_RELEASED = {
    "qwen3": dict(head_dim=128, num_attention_heads=2, num_key_value_heads=1),
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, num_attention_heads=2, num_key_value_heads=1,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3": dict(head_dim=256, query_pre_attn_scalar=256, num_attention_heads=2, num_key_value_heads=1,
                   num_hidden_layers=6, layer_types=None, sliding_window=8),
}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ISOKL_TL_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_each_gguf_architecture_matches_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    fields = _AS_RELEASED.get(family, {})
    # transformers' GGUF loader ignores the rope_freqs tensor of Llama 3.1+ files: compare that
    # one, unquantised, with the checkpoint it was written from
    quantize = family != "llama3"
    path = make_gguf(family, tmp_path / f"{family}.gguf", quantize=quantize, **fields)
    model = load_model(str(path))
    if quantize:
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(make_checkpoint(family, tmp_path / "hf", **fields))
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf.eval()(tokens).logits
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert decode_path(model).reason is None
    if not family.startswith("gemma"):     # (a GPT-2 vocabulary in a Gemma file is read as SentencePiece's)
        text = model.tokenizer.decode(model.tokenizer("Is the Sun a star?").input_ids)
        assert text.endswith("Is the Sun a star?")


def test_a_gguf_is_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from isokl_tl.models import converted

    path = make_gguf("qwen2", tmp_path / "q.gguf")
    first = load_model(str(path))

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(converted, "read_gguf", no_gguf)
    again = load_model(str(path), dtype="bfloat16")
    assert again.cfg.dtype == torch.bfloat16 and again.cfg.original_architecture == "Qwen2ForCausalLM"
    assert torch.equal(again.W_U, first.W_U.bfloat16())
    # the bfloat16 copy written then is what the next bfloat16 load reads, and it holds the cast values
    opened = []
    real = converted.safe_open
    monkeypatch.setattr(converted, "safe_open", lambda f, **k: opened.append(Path(f).name) or real(f, **k))
    third = load_model(str(path), dtype="bfloat16")
    assert opened == ["weights.bfloat16.safetensors"]
    ours, cast = third.state_dict(), first.state_dict()
    assert all(torch.equal(ours[k], cast[k].bfloat16()) for k in cast if cast[k].is_floating_point())


def test_unsupported_gguf_files_say_why(tmp_path):
    import gguf

    from isokl_tl.models.gguf import _llama3_scaling

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="GGUF architecture 'mamba' .* not supported; supported: llama, qwen2"):
        load_model(str(tmp_path / "m.gguf"))
    with pytest.raises(ValueError, match="rope_freqs tensor is not Llama 3 rope scaling"):
        _llama3_scaling(np.linspace(1, 8, 64), 5e5, 128)      # a ramp over every frequency


@pytest.mark.parametrize("released", [(5e5, 128, 32.0, 1.0, 4.0, 8192.0), (5e5, 64, 8.0, 1.0, 4.0, 8192.0),
                                      (1e4, 128, 4.0, 1.0, 4.0, 2048.0)])
def test_llama3_scaling_is_read_back_from_the_divisors(released):
    from isokl_tl.models.gguf import _llama3_divisors, _llama3_scaling

    base, dim, factor, low, high, original = released
    got = _llama3_scaling(_llama3_divisors(*released), base, dim)
    assert (got["factor"], got["low_freq_factor"], got["high_freq_factor"],
            got["original_max_position_embeddings"]) == (factor, low, high, original)
