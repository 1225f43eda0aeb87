import pytest
import torch
import torch.nn.functional as F

from isokl_tl.engine import FastDecoder, cpu_linear, fusion
from isokl_tl.models import TINY, load_model

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no oneDNN in this torch build")


def test_packed_multiply_matches_f_linear_and_packs_each_weight_once(tiny):
    packer = cpu_linear.packer(tiny)
    assert packer is cpu_linear.packer(tiny)                   # one per model
    w = fusion.join(tiny.blocks[0]).gate_up
    x = torch.randn(5, 3, tiny.cfg.d_model)
    got = packer.linear(x, w)
    torch.testing.assert_close(got, F.linear(x, w), atol=1e-5, rtol=1e-5)
    n = len(packer.packed)
    packer.linear(x[:2], w)
    assert len(packer.packed) == n                             # reused, not packed again
    other = torch.randn_like(w)                                # not a model weight: F.linear, exactly
    assert torch.equal(packer.linear(x, other), F.linear(x, other))


def test_a_weight_edited_in_place_is_packed_again():
    model = load_model(TINY)
    packer = cpu_linear.packer(model)
    mlp = model.blocks[1].mlp
    x = torch.randn(4, 1, mlp.W_out.shape[0])
    before = packer.linear(x, mlp.W_out.T)
    with torch.no_grad():
        mlp.W_out.mul_(2)                                      # bumps the version counter
    after = packer.linear(x, mlp.W_out.T)
    torch.testing.assert_close(after, 2 * before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, F.linear(x, mlp.W_out.T), atol=1e-5, rtol=1e-5)


def test_the_cpu_fast_path_multiplies_through_the_packer_and_keeps_parity(tiny, tiny_direction):
    from parity import same_as_reference

    dec = FastDecoder(tiny, None, 8)
    assert dec.linear == cpu_linear.packer(tiny).linear
    assert FastDecoder(tiny, None, 8, fuse=False).linear is F.linear
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    kw = dict(direction=tiny_direction.vector, hook="blocks.2.hook_resid_post", window=12, eos=[])
    same_as_reference(tiny, FastDecoder, prompts, torch.tensor([4.0, 8.0]), **kw)
