"""A rollout keeps its fixed-shape decoder for the next rollout of the same shape (on the GPU the
captured graph comes with it): the next rollout must give exactly what a fresh decoder gives, and
leave earlier results alone. On CPU these exercise the kept buffers and the hand-over of steering;
`benchmarks/bench_gpu.py` checks a kept CUDA graph the same way."""

import pytest
import torch

from isokl_tl.engine import GraphDecoder, pool
from isokl_tl.hooks import Site, steer_sites
from isokl_tl.prompts import load_prompts
from isokl_tl.rollout import rollout
from isokl_tl.tokens import prompt_ids


def _run(model, direction, coeffs, window=12, eos=None):
    prompts = [prompt_ids(model.tokenizer, p) for p in load_prompts("eval")[:3]]
    return rollout(model, prompts, coeffs, direction=direction, hook="blocks.2.hook_resid_post",
                   window=window, decoder=GraphDecoder, eos=eos)


def _same(a, b):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.gen_len, b.gen_len)
    assert torch.equal(a.base_agree, b.base_agree)
    torch.testing.assert_close(a.kl, b.kl, atol=0, rtol=0, equal_nan=True)


def test_a_kept_decoder_serves_the_next_rollout_exactly_as_a_fresh_one(tiny, tiny_direction):
    v = tiny_direction.vector.clone()
    w = torch.roll(v, 7)                                   # another direction, same norm
    c1, c2 = torch.tensor([3.0, 9.0, 5.0]), torch.tensor([12.0, 1.0, 20.0])
    # EOS tokens that end every row of the second rollout before its first EOS check (step 16)
    # and never occur in the first, so that anything the first left in the kept buffers would
    # show in the second's unwritten tail
    seen = set(_run(tiny, v, c1, window=40, eos=[]).tokens.flatten().tolist())
    early = _run(tiny, w, c2, window=40, eos=[]).tokens[:, 1:14].tolist()
    eos = [next((t for t in row if t not in seen), None) for row in early]
    assert None not in eos, "no token ends a row of the second rollout early: pick other coefficients"
    pool.release(tiny)
    first = _run(tiny, v, c1, window=40, eos=eos)
    saved = first.kl.clone()
    kept = list(pool._kept(tiny).values())
    assert len(kept) == 1
    second = _run(tiny, w, c2, window=40, eos=eos)                  # same shape, other values
    assert list(pool._kept(tiny).values()) == kept  # the same decoder served it
    torch.testing.assert_close(first.kl, saved, atol=0, rtol=0, equal_nan=True)   # left alone
    assert torch.equal(v, tiny_direction.vector)          # the caller's tensors are not written
    pool.release(tiny)
    fresh = _run(tiny, w, c2, window=40, eos=eos)
    _same(second, fresh)
    assert int(fresh.gen_len.max()) < 16 and int(first.gen_len.min()) == 40
    assert second.kl[0].nan_to_num().max() > 1e-2


def test_another_shape_gets_its_own_decoder(tiny, tiny_direction):
    pool.release(tiny)
    _run(tiny, tiny_direction.vector, torch.tensor([3.0, 9.0, 0.0]))
    _run(tiny, tiny_direction.vector, torch.tensor([3.0, 9.0, 1.0]))   # one more partner row
    _run(tiny, tiny_direction.vector, torch.tensor([3.0, 9.0, 0.0]), window=10)
    assert pool.kept_count(tiny) == pool.KEEP
    pool.release(tiny)
    assert pool.kept_count(tiny) == 0


def test_a_model_with_kept_decoders_is_freed_when_deleted(tiny_direction):
    import gc
    import weakref

    from isokl_tl.models import TINY, load_model

    model = load_model(TINY)
    _run(model, tiny_direction.vector, torch.tensor([3.0, 9.0, 0.0]))
    assert pool.kept_count(model) == 1
    gone = weakref.ref(model)
    gc.disable()                      # freed by reference counting alone, not by the collector
    try:
        del model
        assert gone() is None
    finally:
        gc.enable()


def test_nothing_is_kept_while_another_hook_is_registered(tiny, tiny_direction):
    pool.release(tiny)
    with tiny.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: x)]):
        _run(tiny, tiny_direction.vector, torch.tensor([3.0, 9.0, 0.0]))
    assert pool.kept_count(tiny) == 0


def test_adopt_copies_into_the_captured_steering_and_refuses_a_mismatch(tiny, tiny_direction):
    v = tiny_direction.vector
    saved = v.clone()
    hook = "blocks.2.hook_resid_post"
    with steer_sites(tiny, [Site(hook, v)], [torch.tensor([1.0, 2.0])]) as old:
        dec = GraphDecoder(tiny, old, 32)
        dec.hold(old)                                      # as at a capture
    with steer_sites(tiny, [Site(hook, -v)], [torch.tensor([5.0, 6.0])]) as new:
        dec.adopt(new)
    assert dec.steering is new
    assert torch.equal(old.handles[0].coeff, torch.tensor([5.0, 6.0]))
    assert torch.equal(old.handles[0].direction, -v)
    assert torch.equal(v, saved) and old.handles[0].direction is not v   # the caller's vector not written
    with steer_sites(tiny, [Site("blocks.1.hook_resid_post", v)], [torch.tensor([5.0, 6.0])]) as other:
        with pytest.raises(ValueError, match="does not match"):
            dec.adopt(other)


def test_a_new_batch_shape_warms_up_again_before_any_capture(tiny):
    """A decoder given another batch shape drops its graph, and its next step runs eagerly again
    (compiling what the new row counts need) before a graph is captured. (On CPU no graph is
    captured, so any prefill drops it; on the GPU a kept graph of the same shape is kept warm,
    which `bench_gpu.py`'s kept-decoder check exercises.)"""
    dec = GraphDecoder(tiny, None, 32)
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    dec.prefill(tokens, torch.ones_like(tokens))
    dec.step(tokens[:, -1])
    assert dec.warmed
    dec.prefill(tokens[:2], torch.ones_like(tokens[:2]))     # another shape: warms up again
    assert not dec.warmed and dec.graph is None
    dec.step(tokens[:2, -1])
    assert dec.warmed
