"""Every decoder family loads from a local checkpoint (random-init, made offline with
`transformers`), matches `transformers`' own logits, and, where it gets a fast decoder, decodes
exactly as TransformerLens's forward does."""

import pytest
import torch
from parity import same_as_reference

from isokl_tl.engine import FastDecoder, GraphDecoder, decode_path
from isokl_tl.models import load_model
from isokl_tl.models.checkpoints import FAMILIES, make_checkpoint

# the families the fast decoders cover; every other one decodes on TransformerLens's forward, with a reason
FAST = ("gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "llama", "llama3", "mistral", "mistral_window", "qwen2", "qwen3",
        "phi", "phi3", "gemma", "gemma2", "gemma3", "olmo", "olmo2", "olmo3")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    def get(family: str):
        if not (root / family).exists():
            if family == "gpt2_scaled":     # a variant the fast path does not cover: the reference decoder's case
                make_checkpoint("gpt2", root / family, scale_attn_by_inverse_layer_idx=True)
            else:
                make_checkpoint(family, root / family)
        return root / family
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_and_matches_transformers(family, checkpoints):
    from transformers import AutoModelForCausalLM

    where = checkpoints(family)
    model = load_model(str(where))
    hf = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert theirs.abs().max() > 1e-2                       # the random model says something
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    path = decode_path(model)
    assert (path.reason is None) == (path.name != "reference") == (family in FAST), (family, path)
    if family in ("gemma2", "gemma3", "mistral_window"):             # their sliding windows are real
        assert model.cfg.window_size == (6 if family == "mistral_window" else 8)
        assert "local" in [b.attn.attn_type for b in model.blocks]


@pytest.mark.parametrize("family", FAST)
def test_fast_decoders_are_exact_for_each_family_they_cover(family, checkpoints):
    model = load_model(str(checkpoints(family)))
    assert decode_path(model).reason is None
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    # steered in the last block (of two) and below it, where the prefill's last block runs on its last column
    for hook in ("blocks.1.hook_resid_post", "blocks.0.hook_resid_post"):
        kw = dict(direction=v / v.norm(), hook=hook, window=10, eos=[])   # past any sliding window
        for decoder in (FastDecoder, GraphDecoder):
            got, _ = same_as_reference(model, decoder, [list(range(5, 15)), list(range(40, 46))],
                                       torch.tensor([3.0, 0.0]), **kw)
        assert got.kl[0].max() > 1e-4


@pytest.mark.parametrize("family", FAST)
def test_a_prefill_and_a_fork_give_a_full_forwards_logits_for_each_family(family, checkpoints):
    """Their last block runs on the last column only (`FastDecoder.last_column_only`), sliding
    windows, soft caps and other norms included: the logits are still those of `model(...)`."""
    model = load_model(str(checkpoints(family)))
    tokens = torch.tensor([list(range(5, 15)), list(range(40, 50))])
    tail = torch.tensor([list(range(60, 65)), list(range(20, 25))])
    with torch.no_grad():
        full = model(tokens)[:, -1], model(torch.cat([tokens, tail], 1))[:, -1]
    for decoder in (FastDecoder, GraphDecoder):
        dec = decoder(model, None, capacity=32)
        torch.testing.assert_close(dec.prefill(tokens, torch.ones_like(tokens)), full[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dec.fork(tail), full[1], atol=1e-4, rtol=1e-4)


def test_check_model_reports_path_reason_and_parity(checkpoints, tiny):
    from isokl_tl.engine import ReferenceDecoder
    from isokl_tl.model_check import check_model, decode_parity

    fast = check_model(str(checkpoints("llama")))
    assert (fast.architecture, fast.decode_path, fast.reason) == ("LlamaForCausalLM", "fast", None)
    assert fast.default_hook == "blocks.1.hook_resid_post" and fast.parity_max_abs_logit_diff < 1e-4
    ref = check_model(str(checkpoints("gpt2_scaled")))
    assert ref.decode_path == "reference" and ref.reason == "per-layer attention scaling"
    # every decoder, the fixed-shape one too (it hands back one logits buffer, step after step)
    for decoder in (FastDecoder, GraphDecoder, ReferenceDecoder):
        assert decode_parity(tiny, "blocks.2.hook_resid_post", decoder=decoder) < 1e-4
    # and the measure is not blind: a decoder that hands back stale logits is far off
    class Stale(FastDecoder):
        def prefill(self, tokens, mask):
            self.first = super().prefill(tokens, mask)
            return self.first

        def step(self, tokens):
            super().step(tokens)
            return self.first
    assert decode_parity(tiny, "blocks.2.hook_resid_post", decoder=Stale) > 1e-2


def test_check_model_command_prints_json(checkpoints):
    import json

    from click.testing import CliRunner
    from isokl_tl_cli.main import main

    for family, path, reason in [("olmo3", "fast", None), ("gpt2_scaled", "reference", "per-layer attention scaling")]:
        res = CliRunner().invoke(main, ["check-model", str(checkpoints(family)), "--json"])
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        assert {"architecture", "decode_path", "reason", "parity_max_abs_logit_diff"} <= set(report)
        assert (report["decode_path"], report["reason"]) == (path, reason)
        assert report["parity_max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_a_bfloat16_load_holds_every_weight_in_bfloat16(family, checkpoints):
    """Converters that compute in float32 (Gemma's norm weights) must not leave float32 tensors in a
    bfloat16 model, where TransformerLens's own forward would fail on them."""
    model = load_model(str(checkpoints(family)), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([list(range(5, 15))])).dtype == torch.bfloat16


def test_rope_scaling_is_applied_or_refused(tmp_path):
    """Gemma 3's linear scaling of its global layers (the 4B+ models) is applied; a scaling
    TransformerLens would drop (here linear on Llama) is refused rather than loaded wrong."""
    from transformers import AutoModelForCausalLM

    rope = {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    where = make_checkpoint("gemma3", tmp_path / "gemma3", rope_parameters=rope)
    model = load_model(str(where))
    assert model.cfg.rotary_scaling_factor == 8.0
    hf = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    linear = make_checkpoint("llama", tmp_path / "llama", rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                          "factor": 4.0})
    with pytest.raises(ValueError, match="uses linear rope scaling, which TransformerLens 3.9 does not apply"):
        load_model(str(linear))

