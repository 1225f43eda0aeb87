import pytest
import torch

from isokl_tl.hooks import steer
from isokl_tl.pmass import fork_pmass, fork_schedule
from isokl_tl.splice import Splice, answer_token_sets
from isokl_tl.prompts import load_prompts
from isokl_tl.rollout import rollout
from isokl_tl.tokens import prompt_ids

HOOK = "blocks.2.hook_resid_post"


def _rollouts(model, direction, eos=None, generated_only=False, method="add"):
    prompts = [prompt_ids(model.tokenizer, p) for p in load_prompts("eval")[:3]]
    return rollout(model, prompts, torch.tensor([0.0, 6.0, 9.0]), direction=direction.vector,
                   hook=HOOK, window=12, eos=eos, generated_only=generated_only, method=method)


@pytest.mark.parametrize("mode", ["interrupt", "inline"])
@pytest.mark.parametrize("generated_only,method", [(False, "add"), (True, "add"), (False, "ablate")])
def test_batched_forks_match_a_plain_full_forward(tiny, tiny_direction, mode, generated_only, method):
    r = _rollouts(tiny, tiny_direction, generated_only=generated_only, method=method)
    splice = Splice(mode=mode, close="\nDone." if mode == "inline" else None)
    forks = fork_schedule(12, every=4)
    pm = fork_pmass(tiny, r, tiny_direction.vector, forks, splice, rows_per_prefill=2).frame
    assert len(pm) == 3 * len(forks)
    t_ids, f_ids = answer_token_sets(tiny.tokenizer, splice.true_words, splice.false_words)
    tail = splice.token_ids(tiny.tokenizer)
    for rec in pm.itertuples():
        prompt, gen = r.row_ids(rec.row, upto=rec.fork)
        seq = torch.tensor([prompt + gen + tail])
        with torch.no_grad(), steer(tiny, HOOK, tiny_direction.vector, float(r.coeff[rec.row]),
                                    method=method, start=len(prompt) if generated_only else 0):
            probs = torch.softmax(tiny(seq)[0, -1].float(), -1)
        pmass = float(probs[t_ids + f_ids].sum())
        assert abs(pmass - rec.pmass) < 1e-4
        assert abs(float(probs[t_ids].sum()) / pmass - rec.p_true) < 1e-4
        assert int(probs.argmax()) == rec.argmax


def test_forks_past_eos_are_censored(tiny, tiny_direction):
    free = _rollouts(tiny, tiny_direction, eos=[])
    stop = int(free.tokens[1, 5])
    r = _rollouts(tiny, tiny_direction, eos=[stop])
    content = int(r.gen_len[1]) - 1
    pm = fork_pmass(tiny, r, tiny_direction.vector, fork_schedule(12, every=2)).frame
    assert pm[pm.row == 1].fork.max() <= content
    assert set(pm[pm.row == 1].fork) == {t for t in range(0, 13, 2) if t <= content}


def test_fork_schedule():
    assert fork_schedule(20, every=8) == [0, 8, 16, 20]
    assert fork_schedule(64, n_log=5)[0] == 0 and fork_schedule(64, n_log=5)[-1] == 64
    assert fork_schedule(64, n_log=5) == [0, 1, 4, 16, 64]
    # log spacing over a short window rounds the first forks together: an error, never fewer forks
    with pytest.raises(ValueError, match=r"fork-log 20 over a 96-token window rounds some forks onto the same "
                                         r"token \(\d+ distinct\); ask for at most (\d+)") as e:
        fork_schedule(96, n_log=20)
    most = int(e.value.args[0].rsplit("at most ", 1)[1].split(",")[0])
    assert len(fork_schedule(96, n_log=most)) == most
    with pytest.raises(ValueError, match="exactly one"):
        fork_schedule(10)
    with pytest.raises(ValueError, match="fork-every must be a positive"):
        fork_schedule(10, every=0)


def test_answer_sets(tiny):
    t, f = answer_token_sets(tiny.tokenizer, ("true", " true", "1"), ("false", "0"))
    assert t and f and not set(t) & set(f)
    with pytest.raises(ValueError, match="overlap"):
        answer_token_sets(tiny.tokenizer, ("yes",), ("yes",))
    with pytest.raises(ValueError, match="does not tokenize"):
        answer_token_sets(tiny.tokenizer, ("",), ("false",))


def test_interrupt_splice_goes_through_the_chat_template(tiny):
    text = Splice().text(tiny.tokenizer)
    assert text.startswith("<|im_end|>\n<|im_start|>user\n") and text.endswith('assistant\n{"choice": ')


def test_a_base_model_reads_plain_prompts_and_needs_the_inline_splice(tiny):
    """A tokenizer without a chat template (a base model): prompts are `PLAIN_PROMPT`, the
    interrupt splice (which needs chat turns) is refused with the fix, the inline one works."""
    import copy

    from isokl_tl.splice import Splice
    from isokl_tl.tokens import PLAIN_PROMPT, prompt_ids

    base = copy.deepcopy(tiny.tokenizer)
    base.chat_template = None
    ids = prompt_ids(base, "Is the Sun a star?")
    assert base.decode(ids) == PLAIN_PROMPT.format(user="Is the Sun a star?")
    assert prompt_ids(tiny.tokenizer, "Is the Sun a star?") != ids
    with pytest.raises(ValueError, match="no chat template.*--splice inline"):
        Splice(mode="interrupt").token_ids(base)
    assert base.decode(Splice(mode="inline").token_ids(base)) == '\n{"choice": '


@pytest.mark.parametrize("decoder", ["reference", "fast", "static"])
@pytest.mark.parametrize("mode,generated_only,method", [("interrupt", False, "add"), ("inline", True, "add"),
                                                        ("interrupt", False, "ablate")])
def test_forks_read_while_decoding_equal_the_reference(tiny, tiny_direction, decoder, mode, generated_only, method):
    """ForkReader forks off each row's own cache as the rollout decodes: the same pmass, p_true and
    argmax as fork_pmass over the finished rollouts (float32, within 1e-5), rows that stop at an
    EOS censored the same way, several batches and a fork at the window's end included."""
    from isokl_tl.engine import FastDecoder, GraphDecoder, ReferenceDecoder
    from isokl_tl.pmass import ForkReader

    factory = {"reference": ReferenceDecoder, "fast": FastDecoder,      # static: the CUDA path's fixed shapes
               "static": lambda m, s, cap: GraphDecoder(m, s, cap, use_graph=False)}[decoder]
    prompts = [prompt_ids(tiny.tokenizer, p) for p in load_prompts("eval")[:4]]
    coeffs = torch.tensor([0.0, 6.0, 9.0, 3.0])
    free = rollout(tiny, prompts, coeffs, direction=tiny_direction.vector, hook=HOOK, window=12, eos=[],
                   method=method, generated_only=generated_only)
    stop = int(free.tokens[1, 5])                      # row 1 ends at an EOS inside the window
    splice, forks = Splice(mode=mode, close="\nDone." if mode == "inline" else None), fork_schedule(12, every=3)
    reader = ForkReader(tiny, forks, splice)
    r = rollout(tiny, prompts, coeffs, direction=tiny_direction.vector, hook=HOOK, window=12, eos=[stop],
                method=method, generated_only=generated_only, decoder=factory, rows_per_batch=3, forks=reader)
    assert bool(r.eos[1]) and int(r.gen_len[1]) < 12
    got = reader.result(r).frame
    ref = fork_pmass(tiny, r, tiny_direction.vector, forks, splice).frame
    assert len(ref) and list(got[["row", "fork", "argmax"]].itertuples(index=False)) == \
        list(ref[["row", "fork", "argmax"]].itertuples(index=False))
    assert 12 in set(got.fork) and got[got.row == 1].fork.max() <= int(r.gen_len[1]) - 1
    for col in ("pmass", "p_true"):
        assert (got[col] - ref[col]).abs().max() < 1e-5, col
    # the cache a fork branched off is left as it was: the rollout is the one decoded without forks
    # (up to rounding: the fixed-shape path attends over a cache made longer for the fork's tail)
    plain = rollout(tiny, prompts, coeffs, direction=tiny_direction.vector, hook=HOOK, window=12, eos=[stop],
                    method=method, generated_only=generated_only, decoder=factory, rows_per_batch=3)
    assert torch.equal(plain.tokens, r.tokens)
    torch.testing.assert_close(plain.kl, r.kl, atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("generated_only,method", [(False, "add"), (True, "add"), (False, "ablate")])
def test_a_fork_before_the_first_step_runs_each_prompt_once_below_the_site(tiny, tiny_direction, generated_only,
                                                                           method):
    """A sweep repeats each prompt at every alpha: at the first generated token their caches are
    still the prompt's, so the fast decoder's fork runs the blocks below the steering site once per
    prompt (and above it once per prompt and coefficient), as its prefill does. The same pmass as the
    reference fork_pmass and as forks that run every row."""
    from isokl_tl.engine import FastDecoder
    from isokl_tl.pmass import ForkReader
    import isokl_tl.engine.fast as fast

    prompts = [prompt_ids(tiny.tokenizer, p) for p in load_prompts("eval")[:2]]
    rows, coeffs = prompts * 4, torch.tensor([0.0, 0.0, 3.0, 3.0, 6.0, 6.0, 3.0, 3.0])    # a repeat at 3.0 too
    splice, forks = Splice(mode="interrupt"), fork_schedule(6, every=3)
    shared = []
    real = fast.distinct_rows

    def counted(tokens, mask, steering, site_block, lower_rows, until=None):
        d = real(tokens, mask, steering, site_block, lower_rows, until)
        shared.append((until is not None, None if d is None else (len(d.below), len(d.above))))
        return d

    def read(spy):
        reader = ForkReader(tiny, forks, splice)
        if spy:
            fast.distinct_rows = counted
        try:
            r = rollout(tiny, rows, coeffs, direction=tiny_direction.vector, hook=HOOK, window=6, eos=[],
                        method=method, generated_only=generated_only, decoder=FastDecoder, forks=reader)
        finally:
            fast.distinct_rows = real
        return r, reader.result(r).frame

    r, got = read(spy=True)
    assert (True, (2, 6)) in shared          # the fork at 0: 2 prompts below the site, 6 (prompt, coeff) above
    assert [u for u, _ in shared].count(True) == 1             # only the fork before the first step
    ref = fork_pmass(tiny, r, tiny_direction.vector, forks, splice).frame
    assert list(got.argmax) == list(ref.argmax) and (got.pmass - ref.pmass).abs().max() < 1e-5
    # forks that run every row
    original = FastDecoder._distinct
    FastDecoder._distinct = lambda self, tokens, mask, until=None: (
        None if until is not None else original(self, tokens, mask))
    try:
        _, every = read(spy=False)
    finally:
        FastDecoder._distinct = original
    for col in ("pmass", "p_true"):
        assert (got[col] - every[col]).abs().max() < 1e-5, col


def _marked_splice(model, r):
    """An inline splice whose thinking markers are two tokens that row 0 of `r` generates, the
    opening one before the closing one, so that its forks fall both inside and outside a block."""
    tok, gen = model.tokenizer, r.tokens[0, :int(r.gen_len[0])].tolist()
    single = [i for i in dict.fromkeys(gen) if tok.encode(tok.decode([i]), add_special_tokens=False) == [i]]
    for a in single:
        for b in single:
            if b != a and gen.index(a) + 1 < len(gen) - gen[::-1].index(b) - 1 and a not in gen[gen.index(b):]:
                return Splice(mode="inline", think_open=tok.decode([a]), think_close=tok.decode([b]))
    pytest.skip("no two distinct round-tripping tokens in the rollout")


def _inside(ids: list[int], markers: tuple[int, int]) -> bool:
    """The plain definition: the last opening marker comes after the last closing one."""
    last = {m: max((i for i, x in enumerate(ids) if x == m), default=-1) for m in markers}
    return last[markers[0]] > last[markers[1]]


def _stop_for(r, row: int, avoid: set[int], keep: list[int]) -> int | None:
    """A token that `row` of `r` generates at position 3-7, that is not in `avoid` and that none of
    the `keep` rows generates: as an EOS id it ends `row` early and leaves the others as they were."""
    kept = {t for k in keep for t in r.tokens[k, :int(r.gen_len[k])].tolist()}
    for t in r.tokens[row, 3:8].tolist():
        if t not in avoid and t not in kept:
            return t
    return None


@pytest.mark.parametrize("decoder", ["reference", "fast", "static"])
def test_forks_inside_a_thinking_block_close_it_and_only_they_do(tiny, tiny_direction, decoder):
    """With thinking markers in the vocabulary the inline splice closes an open block (DESIGN): a
    fork inside one reads `prompt + rollout[:t] + close + prefill`, a fork outside reads
    `prompt + rollout[:t] + prefill`, each against a plain full forward; the forks read while
    decoding equal the reference within 1e-5. One row ends at an EOS inside the window, and its
    forks stop with it."""
    from isokl_tl.engine import FastDecoder, GraphDecoder, ReferenceDecoder
    from isokl_tl.pmass import ForkReader

    factory = {"reference": ReferenceDecoder, "fast": FastDecoder,
               "static": lambda m, s, cap: GraphDecoder(m, s, cap, use_graph=False)}[decoder]
    prompts = [prompt_ids(tiny.tokenizer, p) for p in load_prompts("eval")[:3]]
    coeffs = torch.tensor([0.0, 6.0, 9.0])
    kw = dict(direction=tiny_direction.vector, hook=HOOK, window=12, eos=[])
    free = rollout(tiny, prompts, coeffs, **kw)
    splice, forks = _marked_splice(tiny, free), fork_schedule(12, every=2)
    markers = splice.markers(tiny.tokenizer)
    stop = _stop_for(free, 2, set(markers), keep=[0, 1])
    assert stop is not None, "no token ends row 2 alone"
    kw["eos"] = [stop]
    assert markers is not None and splice.close_text(tiny.tokenizer) == splice.think_close + "\n"
    without, with_close = splice.tails(tiny.tokenizer)
    assert tiny.tokenizer.decode(with_close) == splice.think_close + '\n\n{"choice": '
    reader = ForkReader(tiny, forks, splice)
    r = rollout(tiny, prompts, coeffs, decoder=factory, rows_per_batch=2, forks=reader, **kw)
    assert bool(r.eos[2]) and int(r.gen_len[2]) < 12 and not r.eos[:2].any()
    assert torch.equal(r.tokens[:2], free.tokens[:2])    # rows 0 and 1 as without the EOS id
    got = reader.result(r).frame
    ref = fork_pmass(tiny, r, tiny_direction.vector, forks, splice, rows_per_prefill=2).frame
    assert got[got.row == 2].fork.max() <= int(r.gen_len[2]) - 1 and len(got[got.row == 2])
    assert list(got[["row", "fork", "argmax"]].itertuples(index=False)) == \
        list(ref[["row", "fork", "argmax"]].itertuples(index=False))
    for col in ("pmass", "p_true"):
        assert (got[col] - ref[col]).abs().max() < 1e-5, col
    t_ids, f_ids = answer_token_sets(tiny.tokenizer, splice.true_words, splice.false_words)
    seen = set()
    for rec in ref.itertuples():
        prompt, gen = r.row_ids(rec.row, upto=rec.fork)
        inside = _inside(prompt + gen, markers)
        seen.add(inside)
        seq = torch.tensor([prompt + gen + (with_close if inside else without)])
        with torch.no_grad(), steer(tiny, HOOK, tiny_direction.vector, float(r.coeff[rec.row])):
            probs = torch.softmax(tiny(seq)[0, -1].float(), -1)
        assert abs(float(probs[t_ids + f_ids].sum()) - rec.pmass) < 1e-4
    assert seen == {True, False}                       # both kinds of fork were read
