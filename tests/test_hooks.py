import pytest
import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from isokl_tl.hooks import check_direction, resolve_hook, steer


def _v(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.cfg.d_model, generator=g)
    return v / v.norm()


@pytest.mark.parametrize("method", ["add", "ablate", "gated"])
def test_coefficient_zero_is_bit_identical(tiny, method):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (4, 12))
    with torch.no_grad():
        base = tiny(tokens)
        with steer(tiny, "blocks.1.hook_resid_post", _v(tiny), 0.0, method=method):
            steered = tiny(tokens)
        with steer(tiny, "blocks.1.hook_resid_post", _v(tiny), torch.zeros(4), method=method):
            per_row = tiny(tokens)
    assert torch.equal(base, steered) and torch.equal(base, per_row)


@pytest.mark.parametrize("method", ["mean_diff", "pca", "directional_ablation"])
def test_coefficient_zero_bit_identical_for_every_direction_method(tiny, method):
    from isokl_tl.directions import compute_direction
    from isokl_tl.prompts import load_pairs

    d = compute_direction(tiny, load_pairs()[:6], "blocks.2.hook_resid_post", method)
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 9))
    with torch.no_grad():
        base = tiny(tokens)
        with steer(tiny, d.hook, d.vector, 0.0, method=d.intervention):
            assert torch.equal(tiny(tokens), base)
        with steer(tiny, d.hook, d.vector, 3.0, method=d.intervention):
            assert not torch.equal(tiny(tokens), base)


def test_additive_and_ablation_act_as_defined(tiny):
    v = _v(tiny)
    seen = {}

    def grab(resid, hook):
        seen["h"] = resid.clone()

    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 5))
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
        h = cache["blocks.1.hook_resid_post"]
        for method, c, expect in [("add", 2.5, h + 2.5 * v),
                                  ("ablate", 1.0, h - (h @ v)[..., None] * v)]:
            with steer(tiny, "blocks.1.hook_resid_post", v, c, method=method):
                with tiny.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", grab)]):
                    tiny(tokens)
            torch.testing.assert_close(seen["h"], expect)
    # what the next block received after ablation with c = 1 has no component along v left
    assert (seen["h"] @ v).abs().max() < 1e-4 < (h @ v).abs().max()


def test_per_row_coefficients(tiny):
    v = _v(tiny)
    tokens = torch.randint(0, tiny.cfg.d_vocab, (1, 8), generator=torch.Generator().manual_seed(0)).repeat(3, 1)
    coeffs = torch.tensor([0.0, 2.0, 5.0])
    with torch.no_grad():
        with steer(tiny, "blocks.0.hook_resid_post", v, coeffs):
            batched = tiny(tokens)
        for i, c in enumerate(coeffs):
            with steer(tiny, "blocks.0.hook_resid_post", v, float(c)):
                # (a batch of 3 and a batch of 1 multiply in other orders: rounding, not a wrong coefficient)
                torch.testing.assert_close(batched[i], tiny(tokens[i:i + 1])[0], atol=1e-4, rtol=1e-4)


def test_generated_only_leaves_prompt_positions_alone(tiny):
    v = _v(tiny)
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 10))
    with torch.no_grad():
        base = tiny(tokens)
        with steer(tiny, "blocks.1.hook_resid_post", v, 4.0, start=6):
            out = tiny(tokens)
    assert torch.equal(out[:, :6], base[:, :6])
    assert not torch.allclose(out[:, 6:], base[:, 6:])


def test_hook_fires_at_every_kv_cached_decode_step(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 6))
    steps = 7
    with torch.no_grad(), steer(tiny, "blocks.1.hook_resid_post", _v(tiny), 3.0) as s:
        cache = TransformerLensKeyValueCache.init_cache(tiny.cfg, tiny.cfg.device, 2)
        logits = tiny(tokens, past_kv_cache=cache)
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = tiny(nxt, past_kv_cache=cache)
    assert s.calls == 1 + steps


def test_no_hook_left_behind_even_after_an_exception(tiny):
    hook = "blocks.1.hook_resid_post"
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny, hook, _v(tiny), 1.0):
            assert len(tiny.hook_dict[hook].fwd_hooks) == 1
            raise RuntimeError("boom")
    assert all(len(h.fwd_hooks) == 0 for h in tiny.hook_dict.values())
    with steer(tiny, hook, _v(tiny), 1.0):
        pass
    assert all(len(h.fwd_hooks) == 0 for h in tiny.hook_dict.values())


def test_bad_hook_name_suggests_close_names(tiny):
    with pytest.raises(ValueError, match=r"unknown hook name 'blocks\.1\.hook_resid_pots'.*blocks\.1\.hook_resid_post"):
        with steer(tiny, "blocks.1.hook_resid_pots", _v(tiny), 1.0):
            pass


def test_bad_layer(tiny):
    with pytest.raises(ValueError, match="layer 7 is out of range.*0..3"):
        resolve_hook(tiny, layer=7)
    with pytest.raises(ValueError, match="layer 12.*out of range"):
        resolve_hook(tiny, hook="blocks.12.hook_resid_post")


def test_default_hook_is_at_sixty_percent_depth(tiny):
    assert resolve_hook(tiny) == "blocks.2.hook_resid_post"


@pytest.mark.parametrize("bad, msg", [
    (torch.ones(7), r"shape \(7,\); expected \(64,\)"),
    (torch.ones(2, 64), r"shape \(2, 64\)"),
    (torch.ones(64, dtype=torch.long), "dtype torch.int64"),
    (torch.full((64,), float("nan")), "NaN"),
])
def test_bad_direction(tiny, bad, msg):
    with pytest.raises(ValueError, match=msg):
        check_direction(tiny, bad)


def test_steer_checks_the_direction(tiny):
    for bad in (torch.ones(7), torch.full((64,), float("inf"))):
        with pytest.raises(ValueError, match=r"shape \(7,\)|NaN or inf"):
            with steer(tiny, "blocks.1.hook_resid_post", bad, 1.0):
                pass


def test_coefficient_rows_must_match_batch(tiny):
    with pytest.raises(ValueError, match="coefficient has shape \\(3,\\) but the batch has 2 rows"):
        with torch.no_grad(), steer(tiny, "blocks.1.hook_resid_post", _v(tiny), torch.ones(3)):
            tiny(torch.zeros(2, 4, dtype=torch.long))


def test_the_cosine_gate_acts_as_defined(tiny):
    """`h + c max(cos(h, v), 0) v`: positions leaning against v untouched, the rest pushed in
    proportion to their cosine; the fast decoders steer exactly as TransformerLens's forward."""
    from parity import same_as_reference

    from isokl_tl.engine import FastDecoder, GraphDecoder
    from isokl_tl.hooks import gate

    h = torch.tensor([[[3.0, 0.0], [-1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    v = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(gate(h, v)[0, :, 0], torch.tensor([1.0, 0.0, 2 ** -0.5, 0.0]))
    v = _v(tiny)
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    seen = {}
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
        h = cache["blocks.1.hook_resid_post"]
        with steer(tiny, "blocks.1.hook_resid_post", v, 4.0, method="gated"):
            with tiny.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", lambda t, hook: seen.update(h=t))]):
                tiny(tokens)
    cos = (h @ v) / h.norm(dim=-1)
    torch.testing.assert_close(seen["h"], h + 4.0 * cos.clamp_min(0)[..., None] * v)
    assert (cos < 0).any() and (cos > 0).any()          # both kinds of position were there
    kw = dict(direction=v, hook="blocks.1.hook_resid_post", window=8, eos=[], method="gated")
    for decoder in (FastDecoder, GraphDecoder):
        same_as_reference(tiny, decoder, [list(range(5, 15)), list(range(40, 46))], torch.tensor([30.0, 0.0]), **kw)


def test_gated_directions_from_a_run(tiny, tmp_path):
    from isokl_tl.config import RunConfig
    from isokl_tl.run import Run

    run = Run(tmp_path / "run", RunConfig(model="tiny-random", gate=True, layer=2), model=tiny, progress=False,
              log=lambda m: None)
    d = run.direction()
    assert d.intervention == "gated" and d.method == "mean_diff"
    # results name the gate: the summary's headline and the calibration's figure
    from isokl_tl.calibrate import CalibrationSettings, calibrate
    from isokl_tl.plots import plot_calibration
    from isokl_tl.prompts import load_prompts
    from isokl_tl.tokens import prompt_ids
    assert d.label == "mean_diff (cosine-gated)" and run.direction().negated().label == d.label
    prompts = [prompt_ids(tiny.tokenizer, p) for p in load_prompts("calibration")[:2]]
    cal = calibrate(tiny, d, prompts, CalibrationSettings(window=6, bootstrap=0, target=0.05))
    assert cal.extra["intervention"] == "gated"
    assert plot_calibration(cal).get_title().startswith("mean_diff (cosine-gated) @ blocks.2.hook_resid_post")
    with pytest.raises(ValueError, match="--gate scales an added direction"):
        RunConfig(gate=True, method="directional_ablation")

