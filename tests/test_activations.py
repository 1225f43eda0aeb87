import pytest
import torch

from isokl_tl.activations import Activations, Record
from isokl_tl.engine import FastDecoder, GraphDecoder, ReferenceDecoder
from isokl_tl.hooks import Steering
from isokl_tl.rollout import rollout

HOOK = "blocks.2.hook_resid_post"
DECODERS = {
    "tl": ReferenceDecoder,
    "fast": FastDecoder,
    "static": lambda m, s, cap: GraphDecoder(m, s, cap, use_graph=False),
}


def _prompts(model, n):
    from isokl_tl.prompts import load_prompts
    from isokl_tl.tokens import prompt_ids

    return [prompt_ids(model.tokenizer, p) for p in load_prompts("calibration")[:n]]


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_recorded_residual_is_exactly_what_the_steering_hook_produced(tiny, tiny_direction,
                                                                        monkeypatch, decoder):
    produced = []
    original = Steering.__call__

    def spy(self, resid, hook):
        out = original(self, resid, hook)
        produced.append(out[:, -1].detach().clone())
        return out

    monkeypatch.setattr(Steering, "__call__", spy)
    coeffs = torch.tensor([6.0, 0.0, 12.0])
    r = rollout(tiny, _prompts(tiny, 3), coeffs, direction=tiny_direction.vector, hook=HOOK,
                window=8, eos=[-1], decoder=DECODERS[decoder],
                record=Record(full=("steering",), dtype=torch.float32))
    full = r.acts.full[HOOK]
    assert full.shape == (3, 8, tiny.cfg.d_model)
    assert len(produced) == 8                      # prefill + 7 steps, no row left early
    for t, out in enumerate(produced):
        assert torch.equal(full[:, t], out[:3])    # steered rows come first in the batch


def test_delta_is_zero_before_the_steering_site_and_c_at_it(tiny, tiny_direction):
    coeffs = torch.tensor([6.0, 0.0, 12.0])
    r = rollout(tiny, _prompts(tiny, 3), coeffs, direction=tiny_direction.vector, hook=HOOK,
                window=8, record=Record())
    a = r.acts
    layers = [int(h.split(".")[1]) for h in a.hooks]
    assert a.hooks == [f"blocks.{i}.hook_resid_post" for i in range(tiny.cfg.n_layers)]
    ok = r.mask
    for i, layer in enumerate(layers):
        d = a.delta[:, i][ok]
        if layer < 2:                              # float rounding of another batch row only
            assert (d / a.norm[:, i][ok]).max() < 1e-5
        elif layer == 2:
            expect = coeffs[:, None].expand_as(a.delta[:, i])[ok]
            torch.testing.assert_close(d, expect, rtol=1e-4, atol=1e-4)
    assert torch.all(a.delta[1][:, ok[1]] == 0)    # a coefficient-0 row is its own base
    # projection and norm are those of the recorded steered residual
    full = r.acts.full[HOOK].float()
    i = a.hooks.index(HOOK)
    v = tiny_direction.vector.float()
    torch.testing.assert_close(a.proj[:, i][ok], (full @ v)[ok], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(a.norm[:, i][ok], full.norm(dim=-1)[ok], rtol=1e-2, atol=1e-2)
    assert torch.isnan(a.norm[~ok[:, None, :].expand_as(a.norm)]).all()


def test_recording_changes_no_token_or_kl_and_round_trips(tiny, tiny_direction, tmp_path):
    prompts, coeffs = _prompts(tiny, 4), torch.tensor([0.0, 4.0, 8.0, 16.0])
    kw = dict(direction=tiny_direction.vector, hook=HOOK, window=10, rows_per_batch=3)
    plain = rollout(tiny, prompts, coeffs, **kw)
    rec = rollout(tiny, prompts, coeffs, **kw, record=Record(names=["blocks.1.hook_resid_post", HOOK]))
    assert torch.equal(plain.tokens, rec.tokens)
    torch.testing.assert_close(plain.kl, rec.kl, rtol=0, atol=0, equal_nan=True)
    assert rec.acts.proj.shape == (4, 2, 10)           # chunks of 3 + 1 rows were concatenated
    rec.save(tmp_path)
    back = Activations.load(tmp_path)
    assert back.hooks == rec.acts.hooks
    torch.testing.assert_close(back.delta, rec.acts.delta, equal_nan=True)
    assert torch.equal(back.full[HOOK].isnan(), rec.acts.full[HOOK].isnan())
    frame = back.to_frame()
    assert len(frame) == 2 * int(rec.gen_len.sum())
    assert set(frame.columns) >= {"row", "hook", "layer", "t", "proj", "norm", "delta"}
    plain.save(tmp_path)                                # a later plain rollout leaves no stale file
    assert not (tmp_path / "activations.safetensors").exists()


def test_record_rejects_non_residual_hooks(tiny, tiny_direction):
    with pytest.raises(ValueError, match="not a residual-stream site"):
        rollout(tiny, _prompts(tiny, 1), torch.tensor([1.0]), direction=tiny_direction.vector,
                hook=HOOK, window=2, record=Record(names=["blocks.1.attn.hook_pattern"]))
