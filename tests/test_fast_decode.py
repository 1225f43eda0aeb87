import pytest
import torch
from parity import same_as_reference

from isokl_tl.engine import FastDecoder, GraphDecoder, ReferenceDecoder, make_decoder, unsupported_reason
from isokl_tl.engine.scoring import Sampling
from isokl_tl.hooks import steer
from isokl_tl.prompts import load_prompts
from isokl_tl.rollout import rollout
from isokl_tl.tokens import prompt_ids

# the fast decoders, each run on CPU (the CUDA-graph decoder's fixed-shape step eagerly)
DECODERS = {"fast": FastDecoder, "graph": GraphDecoder}


def _prompts(model, n):
    return [prompt_ids(model.tokenizer, p) for p in load_prompts("eval")[:n]]


@pytest.mark.parametrize("decoder", DECODERS.values(), ids=DECODERS)
@pytest.mark.parametrize("method,c", [("add", 9.0), ("ablate", 1.5)])
@pytest.mark.parametrize("generated_only", [False, True])
def test_fast_decoders_match_transformer_lens_on_tiny(tiny, tiny_direction, decoder, method, c, generated_only):
    got, _ = same_as_reference(tiny, decoder, _prompts(tiny, 4), torch.tensor([0.0, c, c / 3, 2 * c]),
                               direction=tiny_direction.vector, hook="blocks.2.hook_resid_post", window=20,
                               method=method, generated_only=generated_only)
    assert got.kl[1:].nan_to_num().max() > 1e-2


@pytest.mark.parametrize("decoder", DECODERS.values(), ids=DECODERS)
def test_fast_decoders_match_with_eos_inside_the_window_and_when_sampling(tiny, tiny_direction, decoder):
    """Rows stop at an EOS id at different steps (later positions are padding); sampled decoding
    takes the plain step, scoring outside any captured graph."""
    prompts, coeffs = _prompts(tiny, 3), torch.tensor([0.0, 6.0, 12.0])
    kw = dict(direction=tiny_direction.vector, hook="blocks.2.hook_resid_post", window=18)
    _, ref = same_as_reference(tiny, decoder, prompts, coeffs, **kw)
    got, _ = same_as_reference(tiny, decoder, prompts, coeffs, eos=[int(ref.tokens[1, 4])], **kw)
    assert bool(got.eos[1]) and int(got.gen_len[1]) <= 5
    same_as_reference(tiny, decoder, prompts, coeffs, sampling=Sampling(temperature=1.0, seed=3), **kw)


@pytest.mark.slow
def test_fast_path_matches_transformer_lens_on_the_embedded_model(smol):
    from isokl_tl.directions import compute_direction
    from isokl_tl.prompts import load_pairs

    d = compute_direction(smol, load_pairs()[:8], "blocks.18.hook_resid_post", "mean_diff")
    same_as_reference(smol, FastDecoder, _prompts(smol, 3), torch.tensor([0.0, 30.0, 60.0]),
                      direction=d.vector, hook=d.hook, window=24)


def test_hooks_fire_at_every_fast_step(tiny, tiny_direction):
    seen = []
    with steer(tiny, "blocks.1.hook_resid_post", tiny_direction.vector, 2.0) as s:
        with tiny.hooks(fwd_hooks=[("blocks.3.hook_mlp_out", lambda x, hook: seen.append(x.shape))]):
            dec = FastDecoder(tiny, s, capacity=200)
            tokens = torch.tensor([_prompts(tiny, 1)[0]])
            dec.prefill(tokens, torch.ones_like(tokens))
            for _ in range(5):
                dec.step(torch.tensor([7]))
    assert s.calls == 6 and len(seen) == 6 and seen[-1] == (1, 1, 64)


def test_falls_back_when_an_unfired_hook_is_registered(tiny):
    assert isinstance(make_decoder(tiny, None, 32), FastDecoder)
    with tiny.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)]):
        assert "hook_pattern" in unsupported_reason(tiny)
        assert isinstance(make_decoder(tiny, None, 32), ReferenceDecoder)


def test_unsupported_architecture_is_named():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(d_model=16, d_head=4, n_heads=4, n_layers=1, n_ctx=32, d_vocab=50,
                                  act_fn="gelu", normalization_type="LN", positional_embedding_type="shortformer")
    assert unsupported_reason(HookedTransformer(cfg)) == "shortformer positional embeddings"


def test_capacity_is_enforced(tiny):
    dec = FastDecoder(tiny, None, capacity=4)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    dec.prefill(tokens, torch.ones_like(tokens))
    with pytest.raises(ValueError, match="capacity of 4"):
        dec.step(torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("hook", ["blocks.2.hook_resid_post", "blocks.1.hook_resid_pre", "hook_embed"])
def test_shared_prefix_with_rows_leaving_matches_transformer_lens(tiny, tiny_direction, hook):
    """Base partners share the blocks below the steering site with their rows (FastDecoder's
    share_prefix); rows (and their partners) leave the batch at EOS at different steps, unpaired
    coefficient-0 rows in between: tokens and KL still match TransformerLens's path."""
    prompts = _prompts(tiny, 5)
    coeffs = torch.tensor([6.0, 0.0, 12.0, 3.0, 0.0])
    kw = dict(direction=tiny_direction.vector, hook=hook, window=16)
    plain = rollout(tiny, prompts, coeffs, decoder=ReferenceDecoder, **kw)
    stops = [int(plain.tokens[0, 3]), int(plain.tokens[2, 6]), int(plain.tokens[3, 9])]
    splits = []

    class Recording(FastDecoder):
        def share_prefix(self, n_own, partner_of, split):
            super().share_prefix(n_own, partner_of, split)
            splits.append(self.shared.split)
    got, _ = same_as_reference(tiny, Recording, prompts, coeffs, eos=stops, **kw)
    assert splits == [{"blocks.2.hook_resid_post": 2, "blocks.1.hook_resid_pre": 1, "hook_embed": 0}[hook]]
    assert len(set(got.gen_len.tolist())) > 1                 # rows really left at different steps


@pytest.mark.parametrize("decoder", DECODERS.values(), ids=DECODERS)
@pytest.mark.parametrize("generated_only", [False, True])
@pytest.mark.parametrize("hook", ["blocks.2.hook_resid_post", "blocks.1.hook_resid_pre", "hook_embed"])
def test_rows_of_one_prompt_share_the_prefill(tiny, tiny_direction, decoder, generated_only, hook):
    """A sweep's rows repeat each prompt at every coefficient: at prefill the blocks below the
    steering site run once per distinct prompt (`FastDecoder._distinct`), every row's cache gets
    its prompt's keys, and from the first step each row decodes on its own. Tokens and KL match
    TransformerLens's path, with EOS inside the window (rows leave the CPU batch)."""
    prompts = _prompts(tiny, 3)
    rows = [prompts[i] for i in (0, 1, 2, 0, 1, 2, 0, 2)]        # 3 distinct prompts in 8 rows
    coeffs = torch.tensor([0.0, 0.0, 0.0, 6.0, 6.0, 6.0, 12.0, 12.0])
    kw = dict(direction=tiny_direction.vector, hook=hook, window=16, generated_only=generated_only)
    ran = []

    class Counting(decoder):
        def _forward(self, tokens, mask):
            d = self.shared.distinct
            ran.append(None if d is None else (d.below.tolist(), d.above.tolist()))
            return super()._forward(tokens, mask)
    plain = rollout(tiny, rows, coeffs, decoder=ReferenceDecoder, **kw)
    got, _ = same_as_reference(tiny, Counting, rows, coeffs, eos=[int(plain.tokens[4, 5])], **kw)
    # below the site one row per prompt; from it on one per prompt and coefficient: the three at 0,
    # (their base partners repeat them), 3 at 6 and 2 at 12, or with steering from the first
    # generated token on (unsteered at prefill) one per prompt there too
    assert ran[0] == ([0, 1, 2], [0, 1, 2] if generated_only else [0, 1, 2, 3, 4, 5, 6, 7])
    assert all(r is None for r in ran[1:])                        # shared at prefill only
    assert got.kl[3:].nan_to_num().max() > 1e-2


def test_no_prefill_sharing_while_a_hook_below_the_site_would_see_it(tiny, tiny_direction):
    prompts = _prompts(tiny, 2)
    rows, seen = prompts * 3, []
    with tiny.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: seen.append(x.shape[0]))]):
        rollout(tiny, rows, torch.tensor([0.0, 0.0, 3.0, 3.0, 6.0, 6.0]), direction=tiny_direction.vector,
                hook="blocks.2.hook_resid_post", window=4, decoder=FastDecoder)
    assert seen[0] == 6                                            # every own row, at prefill too


@pytest.mark.parametrize("decoder", DECODERS.values(), ids=DECODERS)
def test_unsteered_rows_of_one_prompt_share_the_prefill(tiny, tiny_direction, decoder):
    """Every row at coefficient 0 (no base partners): rows of the same prompt still run the
    prefill once."""
    prompts = _prompts(tiny, 2)
    ran = []

    class Counting(decoder):
        def _forward(self, tokens, mask):
            ran.append(None if self.shared.distinct is None else self.shared.distinct.above.tolist())
            return super()._forward(tokens, mask)
    same_as_reference(tiny, Counting, prompts * 3, torch.zeros(6), direction=tiny_direction.vector,
                      hook="blocks.2.hook_resid_post", window=8)
    assert ran[0] == [0, 1]


@pytest.mark.parametrize("decoder", DECODERS.values(), ids=DECODERS)
def test_the_last_block_of_a_prefill_or_fork_multiplies_its_last_column_only(tiny, decoder):
    """Past the last block's keys and values only the last column's logits are read, so a prefill
    and a fork run the rest of that block for one column (`last_column_only`), and give the
    logits of a full forward. A hook in that block (or the final norm) sees every position, as in
    `model(...)`, and the block runs whole then."""
    last = tiny.cfg.n_layers - 1
    prompts = _prompts(tiny, 2)
    tokens = torch.tensor([p[:9] for p in prompts])
    tail = torch.tensor([prompts[0][9:14], prompts[1][9:14]])
    full = tiny(tokens)[:, -1], tiny(torch.cat([tokens, tail], 1))[:, -1]

    def run():
        widths = []
        dec = decoder(tiny, None, capacity=64)
        linear = dec.linear
        dec.linear = lambda x, w, b=None: (widths.append(tuple(x.shape[:-1])), linear(x, w, b))[1]
        prefill = dec.prefill(tokens, torch.ones_like(tokens)).clone()
        at = len(widths)
        return (prefill, dec.fork(tail).clone()), (widths[:at], widths[at:])
    (prefill, fork), widths = run()
    # per forward, the last block's Q/K/V (every column), attention output, gate/up, down, then the unembedding
    assert widths[0][-5:] == [(2, 9), (2, 1), (2, 1), (2, 1), (2,)]
    assert widths[1][-5:] == [(2, 5), (2, 1), (2, 1), (2, 1), (2,)]
    assert all(w[1] == 9 for w in widths[0][:-5]) and all(w[1] == 5 for w in widths[1][:-5])
    torch.testing.assert_close(prefill, full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fork, full[1], atol=1e-5, rtol=1e-5)
    for name in (f"blocks.{last}.hook_mlp_out", "ln_final.hook_normalized"):
        seen = []
        with tiny.hooks(fwd_hooks=[(name, lambda x, hook: seen.append(x.shape[1]))]):
            (prefill_h, fork_h), widths = run()
        assert seen == [9, 5] and widths[0][-4] == (2, 9) and widths[1][-4] == (2, 5)
        torch.testing.assert_close(prefill_h, prefill, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fork_h, fork, atol=1e-5, rtol=1e-5)


def test_a_cache_keeps_rows_in_place_as_indexing_would():
    """`keep_rows` moves the kept rows of a cache buffer down inside its own memory (in pieces no
    larger than their gap, or through a copy of a long run): the slots that are read equal
    indexing's, over random keeps, gaps and lengths; a keep that is not ascending is indexed."""
    from isokl_tl.engine.kv_cache import keep_rows

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n, length = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(0, 9, (1,), generator=g))
        t = torch.randn(n, 2, 8, 3, generator=g)
        keep = (torch.rand(n, generator=g) < torch.rand(1, generator=g)).nonzero()[:, 0]
        want = t[keep][:, :, :length].clone()
        got = keep_rows(t, keep, length)
        assert got.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        assert torch.equal(got[:, :, :length], want)
    t = torch.randn(5, 2, 8, 3)
    assert torch.equal(keep_rows(t, torch.tensor([3, 1]), 8), t[[3, 1]])
