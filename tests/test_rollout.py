
import pytest
import torch

from isokl_tl.kl import teacher_forced_kl
from isokl_tl.rollout import Rollouts, Sampling, rollout

HOOK = "blocks.2.hook_resid_post"


def _prompts(model, n=3):
    from isokl_tl.prompts import load_prompts
    from isokl_tl.tokens import prompt_ids

    return [prompt_ids(model.tokenizer, p) for p in load_prompts("calibration")[:n]]


def test_batch_of_n_equals_n_single_rows(tiny, tiny_direction):
    prompts = _prompts(tiny, 3)
    coeffs = torch.tensor([0.0, 6.0, 12.0])
    batched = rollout(tiny, prompts, coeffs, direction=tiny_direction.vector, hook=HOOK, window=12)
    for i in range(3):
        single = rollout(tiny, prompts[i:i + 1], coeffs[i:i + 1], direction=tiny_direction.vector,
                         hook=HOOK, window=12)
        assert torch.equal(single.tokens[0], batched.tokens[i])
        torch.testing.assert_close(single.kl[0], batched.kl[i], atol=1e-5, rtol=0, equal_nan=True)
    # chunking rows into several forward batches changes nothing either
    chunked = rollout(tiny, prompts, coeffs, direction=tiny_direction.vector, hook=HOOK, window=12,
                      rows_per_batch=2)
    assert torch.equal(chunked.tokens, batched.tokens)
    torch.testing.assert_close(chunked.kl, batched.kl, atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("method,coeff", [("add", 8.0), ("ablate", 1.5)])
@pytest.mark.parametrize("generated_only", [False, True])
def test_kv_cached_kl_equals_full_recomputation(tiny, tiny_direction, method, coeff, generated_only):
    prompts = _prompts(tiny, 3)
    coeffs = torch.tensor([coeff, coeff / 2, 0.0])
    r = rollout(tiny, prompts, coeffs, direction=tiny_direction.vector, hook=HOOK, window=10,
                method=method, generated_only=generated_only)
    width = r.prompt.shape[1]
    seq = torch.cat([r.prompt, r.tokens.clamp(min=0)], dim=1)
    mask = torch.cat([r.prompt_mask, r.mask.long()], dim=1)
    ref = teacher_forced_kl(tiny, seq, mask, width, hook=HOOK, direction=tiny_direction.vector,
                            coeff=coeffs, method=method, start=width if generated_only else 0)
    assert r.kl[:2].nan_to_num().max() > 1e-3  # steering did something
    torch.testing.assert_close(r.kl, ref, atol=1e-4, rtol=0, equal_nan=True)
    # the base model's log-probability of each steered token, teacher-forced on the whole rollout
    with torch.no_grad():
        base = torch.log_softmax(tiny(seq, attention_mask=mask)[:, width - 1:-1].float(), -1)
    blp = base.gather(-1, r.tokens.clamp(min=0)[..., None])[..., 0].where(r.mask, float("nan"))
    torch.testing.assert_close(r.base_logprob, blp, atol=1e-4, rtol=0, equal_nan=True)
    torch.testing.assert_close(r.base_logprob[2], r.logprob[2], atol=1e-5, rtol=0, equal_nan=True)  # c = 0


def test_alpha_zero_gives_exactly_zero_kl(tiny, tiny_direction):
    r = rollout(tiny, _prompts(tiny, 2), torch.zeros(2), direction=tiny_direction.vector, hook=HOOK,
                window=8, method="ablate")
    assert (r.kl[r.mask] == 0).all()
    assert r.base_agree[r.mask].all()


def test_kl_is_nan_after_eos(tiny, tiny_direction):
    prompts = _prompts(tiny, 2)
    free = rollout(tiny, prompts, torch.tensor([5.0, 5.0]), direction=tiny_direction.vector,
                   hook=HOOK, window=10, eos=[])
    stop = int(free.tokens[0, 3])
    first = int((free.tokens[0] == stop).nonzero()[0])
    r = rollout(tiny, prompts, torch.tensor([5.0, 5.0]), direction=tiny_direction.vector,
                hook=HOOK, window=10, eos=[stop])
    assert bool(r.eos[0]) and int(r.gen_len[0]) == first + 1
    assert torch.isnan(r.kl[0, first + 1:]).all() and not torch.isnan(r.kl[0, :first + 1]).any()
    assert (r.tokens[0, first + 1:] == -1).all()
    frame = r.to_frame()                      # long format: generated tokens only, none NaN
    assert len(frame) == int(r.gen_len.sum()) and frame.kl.notna().all()


def test_sampled_rollouts_follow_the_seed(tiny, tiny_direction):
    prompts, c = _prompts(tiny, 2), torch.tensor([2.0, 2.0])
    kw = dict(direction=tiny_direction.vector, hook=HOOK, window=10)
    a = rollout(tiny, prompts, c, sampling=Sampling(temperature=1.0, seed=3), **kw)
    b = rollout(tiny, prompts, c, sampling=Sampling(temperature=1.0, seed=3), **kw)
    d = rollout(tiny, prompts, c, sampling=Sampling(temperature=1.0, seed=4), **kw)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, d.tokens)


def test_save_load_round_trip(tmp_path, tiny, tiny_direction):
    import pandas as pd

    r = rollout(tiny, _prompts(tiny, 2), torch.tensor([0.0, 3.0]), direction=tiny_direction.vector,
                hook=HOOK, window=6)
    r.save(tmp_path, tiny.tokenizer)
    back = Rollouts.load(tmp_path)
    for k, v in r.__dict__.items():
        if torch.is_tensor(v):
            torch.testing.assert_close(v, getattr(back, k), rtol=0, atol=0, equal_nan=True)
        else:
            assert v == getattr(back, k)
    frame = pd.read_csv(tmp_path / "rollouts.csv")
    assert len(frame) == int(r.gen_len.sum()) and {"kl", "token", "alpha", "t"} <= set(frame.columns)
    r.save(tmp_path / "part", long_format=False)          # a sweep's part: no CSV, the same tensors
    assert not (tmp_path / "part" / "rollouts.csv").exists()
    assert torch.equal(Rollouts.load(tmp_path / "part").tokens, r.tokens)


def test_bad_window_and_context(tiny, tiny_direction):
    with pytest.raises(ValueError, match="window must be a positive number of tokens, got 0"):
        rollout(tiny, _prompts(tiny, 1), torch.ones(1), direction=tiny_direction.vector, hook=HOOK, window=0)
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        rollout(tiny, [[5] * 500], torch.ones(1), direction=tiny_direction.vector, hook=HOOK, window=20)


def test_rows_of_several_sites_in_one_batch_equal_separate_rollouts(tiny, tiny_direction):
    from isokl_tl.hooks import Site

    prompts = _prompts(tiny, 2)
    v = tiny_direction.vector
    w = torch.roll(v, 1)
    w = w / w.norm()
    sites = [Site("blocks.1.hook_resid_post", v, "add"), Site(HOOK, w, "ablate"), Site(HOOK, v, "add")]
    coeffs = torch.tensor([5.0, 0.0, 1.5, 2.0, 9.0, 4.0])
    site = torch.tensor([0, 0, 1, 1, 2, 2])
    together = rollout(tiny, prompts * 3, coeffs, sites=sites, site=site, window=10)
    assert together.hook == "" and together.method == ""
    for j, s in enumerate(sites):
        alone = rollout(tiny, prompts, coeffs[2 * j:2 * j + 2], direction=s.direction, hook=s.hook,
                        method=s.method, window=10)
        assert torch.equal(alone.tokens, together.tokens[2 * j:2 * j + 2])
        torch.testing.assert_close(alone.kl, together.kl[2 * j:2 * j + 2], atol=1e-5, rtol=0,
                                   equal_nan=True)
    with pytest.raises(ValueError, match="site indices must be in 0..2"):
        rollout(tiny, prompts, coeffs[:2], sites=sites, site=torch.tensor([0, 3]), window=2)


@pytest.mark.parametrize("decoder", ["fast", "reference"])
def test_every_row_ending_before_the_window_ends_the_batch(tiny, tiny_direction, decoder):
    """All rows stop at EOS early (on the decoders that drop finished rows): the batch ends there,
    with every record kept."""
    from isokl_tl.engine import FastDecoder, ReferenceDecoder

    dec = {"fast": FastDecoder, "reference": ReferenceDecoder}[decoder]
    prompts = _prompts(tiny, 3)
    coeffs = torch.tensor([0.0, 5.0, 5.0])
    free = rollout(tiny, prompts, coeffs, direction=tiny_direction.vector, hook=HOOK, window=12, eos=[],
                   decoder=dec)
    stops = sorted({int(free.tokens[i, 2]) for i in range(3)})       # every row meets one by token 2
    r = rollout(tiny, prompts, coeffs, direction=tiny_direction.vector, hook=HOOK, window=12, eos=stops,
                decoder=dec)
    assert r.eos.all() and (r.gen_len <= 3).all()
    for i in range(3):
        n = int(r.gen_len[i])
        assert torch.equal(r.tokens[i, :n], free.tokens[i, :n]) and (r.tokens[i, n:] == -1).all()
        assert not torch.isnan(r.kl[i, :n]).any() and torch.isnan(r.kl[i, n:]).all()
