import time

import pytest
import torch

from isokl_tl.chat import eos_ids, prompt_ids
from isokl_tl.layout import relayout_for_decode
from isokl_tl.models import EMBEDDED, TINY, load_model


def test_unknown_spec_lists_accepted():
    with pytest.raises(ValueError, match="unknown model spec 'no-such-model'.*smollm2-135m-instruct.*tiny-random"):
        load_model("no-such-model")


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_model(TINY, dtype="float8")


def test_relayout_is_bit_identical(tiny):
    plain = load_model(TINY, relayout=False)
    assert not plain.blocks[0].mlp.W_in.T.is_contiguous()
    tokens = torch.randint(0, tiny.cfg.d_vocab, (3, 17))
    with torch.no_grad():
        before = plain(tokens)
        relayout_for_decode(plain)
        after = plain(tokens)
    assert plain.blocks[0].mlp.W_in.T.is_contiguous()
    assert torch.equal(before, after)


@pytest.mark.slow
def test_embedded_relayout_bit_identical(smol):
    plain = load_model(EMBEDDED, relayout=False)
    tokens = torch.randint(0, smol.cfg.d_vocab, (2, 23))
    with torch.no_grad():
        assert torch.equal(plain(tokens), smol(tokens))


@pytest.mark.slow
def test_embedded_answers_paris(smol):
    tok = smol.tokenizer
    ids = torch.tensor([prompt_ids(tok, "What is the capital of France?")])
    with torch.no_grad():
        out = smol.generate(ids, max_new_tokens=16, do_sample=False, verbose=False,
                            stop_at_eos=True, eos_token_id=eos_ids(tok))
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_embedded_second_load_is_fast(smol):
    start = time.perf_counter()
    load_model(EMBEDDED)
    assert time.perf_counter() - start < 3.0


@pytest.mark.slow
def test_embedded_matches_hugging_face_gguf_loader(smol):
    """Our GGUF conversion (dequantise, undo the Q/K permutation) against transformers' own."""
    from transformers import AutoModelForCausalLM

    from isokl_tl.models import embedded_gguf_path

    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokens = torch.randint(0, smol.cfg.d_vocab, (2, 31))
    with torch.no_grad():
        assert (smol(tokens) - hf(tokens).logits).abs().max() < 5e-4
