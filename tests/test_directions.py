import pytest
import torch

from isokl_tl.directions import Direction, compute_direction
from isokl_tl.prompts import load_pairs, load_prompts, load_questions


def test_pca_sign_agrees_with_mean_diff(tiny):
    pairs = load_pairs()[:10]
    md = compute_direction(tiny, pairs, "blocks.1.hook_resid_post", "mean_diff")
    pca = compute_direction(tiny, pairs, "blocks.1.hook_resid_post", "pca")
    assert float(pca.vector @ md.vector) > 0
    assert abs(float(pca.vector.norm()) - 1) < 1e-5 and abs(float(md.vector.norm()) - 1) < 1e-5


def test_mean_diff_reads_the_last_completion_token(tiny):
    from isokl_tl.directions import pair_activations
    from isokl_tl.tokens import prompt_ids, text_ids

    pair = load_pairs()[0]
    pos, neg = pair_activations(tiny, [pair], "blocks.1.hook_resid_post")
    ids = prompt_ids(tiny.tokenizer, pair.user) + text_ids(tiny.tokenizer, pair.positive)
    _, cache = tiny.run_with_cache(torch.tensor([ids]), names_filter="blocks.1.hook_resid_post")
    torch.testing.assert_close(pos[0], cache["blocks.1.hook_resid_post"][0, -1], atol=1e-5, rtol=1e-5)


def test_direction_round_trip(tmp_path, tiny_direction):
    tiny_direction.save(tmp_path)
    back = Direction.load(tmp_path)
    assert torch.equal(back.vector, tiny_direction.vector)
    assert back.meta() == tiny_direction.meta()
    assert back.intervention == "add"


def test_unknown_method(tiny):
    with pytest.raises(ValueError, match="unknown direction method 'median'"):
        compute_direction(tiny, load_pairs()[:3], "blocks.1.hook_resid_post", "median")


def test_shipped_sets_sizes_and_disjointness():
    assert len(load_pairs()) >= 24
    calib, ev = load_prompts("calibration"), load_questions("eval")
    assert len(calib) >= 8 and len(ev) >= 48
    assert {True, False} <= {q.answer for q in ev}
    assert not set(calib) & {q.question for q in ev}
    assert not set(calib) & set(load_prompts("eval"))
    assert not set(calib) & set(load_prompts("longform"))


def test_prompt_file_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_prompts(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_prompts(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")
