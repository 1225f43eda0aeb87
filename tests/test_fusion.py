import pytest
import torch

from isokl_tl.engine import FastDecoder, GraphDecoder, ReferenceDecoder, fusion
from isokl_tl.prompts import load_prompts
from isokl_tl.rollout import rollout
from isokl_tl.tokens import prompt_ids


def test_loaded_models_store_qkv_and_gate_up_joined(tiny):
    for block in tiny.blocks:
        j = fusion.join(block)
        attn, mlp = block.attn, block.mlp
        assert j.qkv is not None and j.gate_up is not None
        d = tiny.cfg.d_head
        torch.testing.assert_close(j.qkv[:attn.W_Q.shape[0] * d], attn.W_Q.permute(0, 2, 1).reshape(-1, tiny.cfg.d_model))
        torch.testing.assert_close(j.gate_up, torch.cat([mlp.W_gate.T, mlp.W_in.T]))


def test_weights_not_stored_joined_are_not_fused(tiny):
    attn = tiny.blocks[0].attn
    assert fusion.joined_rows(attn.W_Q, attn._W_V) is None        # not consecutive
    assert fusion.joined_rows(attn.W_Q.detach().clone(), attn._W_K) is None


def test_fused_norm_matches_the_module_and_fires_its_hooks(tiny):
    ln = tiny.blocks[1].ln1
    x = torch.randn(3, 2, tiny.cfg.d_model)
    torch.testing.assert_close(fusion.norm(ln, x), ln(x), atol=1e-6, rtol=1e-5)
    seen = []
    for name in ("hook_normalized", "hook_scale"):
        with tiny.hooks(fwd_hooks=[(f"blocks.1.ln1.{name}", lambda t, hook: seen.append(hook.name) or 2 * t)]):
            torch.testing.assert_close(fusion.norm(ln, x), ln(x), atol=1e-6, rtol=1e-5)
    assert seen == ["blocks.1.ln1.hook_normalized"] * 2 + ["blocks.1.ln1.hook_scale"] * 2


def test_q_and_k_rotate_together_exactly(tiny):
    attn = tiny.blocks[0].attn
    j = fusion.join(tiny.blocks[0])
    rot = fusion.Rotary(tiny)
    assert len({id(t) for t in rot.tables}) == 1     # equal tables: one lookup per step for all layers
    x = torch.randn(3, 1, tiny.cfg.d_model)
    q, k, _ = fusion.qkv(attn, j, x)
    cos, sin = rot.rows(torch.tensor([[4], [9], [0]]))[0]
    rq, rk = rot.rotate_qk(q, k, cos, sin)
    assert rq._base is rk._base                      # one pass over both
    sq, sk = rot.rotate_qk(q.clone(), k.clone(), cos, sin)
    assert sq._base is None or sq._base is not sk._base
    assert torch.equal(rq, sq) and torch.equal(rk, sk)
    # TransformerLens's rotation at the same positions (4, 9, 0: unmasked tokens before, from 0)
    mask = torch.tensor([[0] * 5 + [1] * 5, [1] * 10, [0] * 9 + [1]])
    assert torch.equal(rq, attn.apply_rotary(q.clone(), 9, mask))
    assert torch.equal(rk, attn.apply_rotary(k.clone(), 9, mask))


def _prompts(model, n):
    return [prompt_ids(model.tokenizer, p) for p in load_prompts("eval")[:n]]


@pytest.mark.parametrize("decoder", [FastDecoder, lambda m, s, c, **kw: GraphDecoder(m, s, c, use_graph=False, **kw)])
def test_fused_and_unfused_steps_agree(tiny, tiny_direction, decoder):
    prompts = _prompts(tiny, 4)
    c = torch.tensor([0.0, 9.0, 3.0, 18.0])
    kw = dict(direction=tiny_direction.vector, hook="blocks.2.hook_resid_post", window=16)
    fused = rollout(tiny, prompts, c, decoder=lambda m, s, cap: decoder(m, s, cap), **kw)
    plain = rollout(tiny, prompts, c, decoder=lambda m, s, cap: decoder(m, s, cap, fuse=False), **kw)
    assert torch.equal(fused.tokens, plain.tokens)
    torch.testing.assert_close(fused.kl, plain.kl, atol=1e-5, rtol=0, equal_nan=True)


def test_hooks_inside_fused_blocks_change_the_result_as_in_transformer_lens(tiny, tiny_direction):
    """Hooks on hook_q, hook_pre_linear and hook_scale (which each switch part of the fusion off or
    receive views of a joined result) act exactly as in TransformerLens's own forward."""
    prompts = _prompts(tiny, 3)
    c = torch.tensor([0.0, 9.0, 18.0])
    kw = dict(direction=tiny_direction.vector, hook="blocks.2.hook_resid_post", window=12)
    hooks = [("blocks.1.attn.hook_q", lambda t, hook: 1.5 * t),
             ("blocks.2.mlp.hook_pre_linear", lambda t, hook: t.flip(-1)),
             ("blocks.3.ln2.hook_scale", lambda t, hook: 2 * t)]
    plain = rollout(tiny, prompts, c, decoder=ReferenceDecoder, **kw)
    with tiny.hooks(fwd_hooks=hooks):
        ref = rollout(tiny, prompts, c, decoder=ReferenceDecoder, **kw)
        fast = rollout(tiny, prompts, c, decoder=FastDecoder, **kw)
    assert not torch.equal(ref.tokens, plain.tokens)     # the hooks matter
    assert torch.equal(fast.tokens, ref.tokens)
    torch.testing.assert_close(fast.kl, ref.kl, atol=1e-4, rtol=0, equal_nan=True)
