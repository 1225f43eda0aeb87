
import pytest
import torch

from isokl_tl.engine import relayout_for_decode
from isokl_tl.models import EMBEDDED, TINY, load_model
from isokl_tl.tokens import eos_ids, prompt_ids


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
def test_embedded_second_load_reads_the_converted_cache(smol, monkeypatch):
    """The GGUF is dequantised once; later loads read the cached safetensors (`bench_startup.py`
    times it) and give the same weights."""
    from isokl_tl.models import converted

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(converted, "read_gguf", no_gguf)
    again = load_model(EMBEDDED)
    assert torch.equal(again.W_U, smol.W_U) and torch.equal(again.blocks[3].mlp.W_in, smol.blocks[3].mlp.W_in)


@pytest.mark.slow
def test_embedded_matches_hugging_face_gguf_loader(smol):
    """Our GGUF conversion (dequantise, undo the Q/K permutation) against transformers' own."""
    from transformers import AutoModelForCausalLM

    from isokl_tl.models.loading import embedded_gguf_path

    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokens = torch.randint(0, smol.cfg.d_vocab, (2, 31))
    with torch.no_grad():
        assert (smol(tokens) - hf(tokens).logits).abs().max() < 5e-4


@pytest.fixture(scope="module")
def olmo2_dir(tmp_path_factory):
    """A random OLMo-2 checkpoint (post-norm blocks, QK norm) with the tiny BPE tokenizer."""
    import transformers

    from isokl_tl.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = transformers.Olmo2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tok),
                                   max_position_embeddings=256, initializer_range=0.2,
                                   eos_token_id=None, pad_token_id=None, bos_token_id=None)
    cfg.architectures = ["Olmo2ForCausalLM"]
    torch.manual_seed(0)
    where = tmp_path_factory.mktemp("olmo2")
    transformers.Olmo2ForCausalLM(cfg).eval().save_pretrained(where)
    tok.save_pretrained(where)
    return where


def test_local_olmo2_checkpoint_loads_and_matches_hugging_face(olmo2_dir):
    from transformers import AutoModelForCausalLM

    model = load_model(str(olmo2_dir))
    hf = AutoModelForCausalLM.from_pretrained(olmo2_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_fast_paths_cover_olmo2_blocks(olmo2_dir):
    from parity import same_as_reference

    from isokl_tl.engine import FastDecoder, GraphDecoder, make_decoder, unsupported_reason

    model = load_model(str(olmo2_dir))
    assert unsupported_reason(model) is None
    assert isinstance(make_decoder(model, None, 8), FastDecoder)
    prompts = [list(range(5, 15)), list(range(40, 47))]
    v = torch.randn(model.cfg.d_model)
    kw = dict(direction=v / v.norm(), hook="blocks.1.hook_resid_post", window=12, eos=[])
    coeffs = torch.tensor([3.0, 0.0])
    for dec in (FastDecoder, GraphDecoder):
        _, ref = same_as_reference(model, dec, prompts, coeffs, **kw)
    assert ref.kl[0].max() > 1e-3


def test_model_identity_tells_checkpoints_apart():
    """The weights' hash (a strided sample of each matrix) is the same for the same weights and
    changes with another seed, or with one matrix fine-tuned (every entry moved a little)."""
    import torch

    from isokl_tl.manifest import model_identity
    from isokl_tl.models.tiny import tiny_model

    a, b, c = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    assert model_identity(a)["weights_sha256"] == model_identity(b)["weights_sha256"]
    assert model_identity(a)["weights_sha256"] != model_identity(c)["weights_sha256"]
    with torch.no_grad():
        b.blocks[1].mlp.W_in.mul_(1.001)
    assert model_identity(a)["weights_sha256"] != model_identity(b)["weights_sha256"]


def test_end_of_turn_ids_are_the_eos_and_the_markers_the_vocabulary_holds(smol, tiny):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from isokl_tl.models.tiny import tiny_tokenizer

    for tok in (smol.tokenizer, tiny.tokenizer):
        vocab = tok.get_vocab()
        markers = {vocab[m] for m in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>") if m in vocab}
        assert eos_ids(tok) == sorted(markers | {tok.eos_token_id}) and len(markers) >= 2
    # a marker added to the vocabulary later is found too
    own = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())      # not the shared one
    tok = PreTrainedTokenizerFast(tokenizer_object=own, eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    assert tok.convert_tokens_to_ids("<end_of_turn>") in eos_ids(tok)
