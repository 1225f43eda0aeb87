"""Thinking blocks: which forks fall inside an open `<think>` block, and what a run says of it."""

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from isokl_tl.models.tiny import tiny_tokenizer
from isokl_tl.summary import thinking_lines
from isokl_tl.thinking import marker_ids, open_at, thinking_report

OPEN, CLOSE = 900, 901


def test_a_fork_is_inside_a_block_from_the_token_after_its_opening_to_its_closing():
    # row 0: the block opens at generated token 2 and closes at 6; row 1: the prompt opens it
    # (left-padded) and the rollout never closes it; row 2: no markers at all
    prompt = torch.tensor([[-5, 10, 11], [10, 11, OPEN], [10, 11, 12]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    tokens = torch.tensor([[20, 21, OPEN, 22, 23, 24, CLOSE, 25, -1, -1],
                           [20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
                           [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]])
    forks = [0, 2, 3, 6, 7, 10]
    inside = open_at(prompt, mask, tokens, forks, (OPEN, CLOSE))
    assert inside.tolist() == [[False, False, True, True, False, False],
                               [True] * 6,
                               [False] * 6]
    # a padded prompt position holding a marker's id is not read as one
    padded = open_at(torch.tensor([[OPEN, 10]]), torch.tensor([[0, 1]]), torch.tensor([[20, 21]]), [0, 2],
                     (OPEN, CLOSE))
    assert not padded.any()


def test_markers_count_only_as_single_tokens_of_the_vocabulary():
    plain = tiny_tokenizer()
    assert marker_ids(plain) is None                      # "<think>" is several byte-level tokens there
    thinking = copy.deepcopy(plain)
    thinking.add_tokens(["<think>", "</think>"])
    ids = marker_ids(thinking)
    assert ids is not None and thinking.decode([ids[0]]) == "<think>" and thinking.decode([ids[1]]) == "</think>"


def _report(close: str, mode: str = "inline"):
    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_tokens(["<think>", "</think>"])
    o, c = marker_ids(tok)
    rollouts = SimpleNamespace(prompt=torch.tensor([[5, o], [5, 6]]), prompt_mask=torch.ones(2, 2, dtype=torch.long),
                               tokens=torch.tensor([[7, 8, c, 9], [7, 8, 9, 10]]))
    frame = pd.DataFrame({"row": [0, 0, 0, 1, 1, 1], "fork": [0, 2, 4, 0, 2, 4]})
    return thinking_report(frame, rollouts, tok, {"mode": mode, "close": close})


def test_a_run_counts_the_forks_inside_a_block():
    report = _report(close="")
    assert report == {"markers": ["<think>", "</think>"], "forks": 6, "forks_inside": 2}
    assert _report(close="", mode="interrupt") is None                      # the turn ends: nothing to close
    line, = thinking_lines(report, "</think>\n")
    assert line == ("- thinking blocks: 2 of 6 evaluated forks fall inside an open `<think>` block; the inline "
                    "splice closes it there ('</think>\\n') and only there")
    off, = thinking_lines(report, "")
    assert off.endswith("the inline splice does not close it (its close is turned off)")
    assert thinking_lines(None) == []


def test_the_splice_has_a_close_only_where_thinking_is_marked():
    from isokl_tl.splice import Splice

    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_tokens(["<think>", "</think>"])
    inline = Splice(mode="inline")
    assert inline.markers(tok) == marker_ids(tok) and inline.close_text(tok) == "</think>\n"
    # with the prefill's newline: the two newlines a reasoning model writes after its block
    assert [tok.decode(t) for t in inline.tails(tok)] == ['\n{"choice": ', '</think>\n\n{"choice": ']
    d = inline.to_dict(tok)
    assert d["close_at"] == "forks inside an open thinking block"
    assert d["tail_texts"] == ['\n{"choice": ', '</think>\n\n{"choice": '] and d["rendered"] == d["tail_texts"][1]
    off = Splice(mode="inline", close="")                                   # the close turned off: one splice
    assert off.markers(tok) is None and off.tail_texts(tok) == ['\n{"choice": ']
    assert off.to_dict(tok)["close_at"] == "no fork"
    own = Splice(mode="inline", close="\nDone.</think>")
    assert own.close_text(tok) == "\nDone.</think>" and len(own.tails(tok)) == 2
    plain = tiny_tokenizer()                                                 # no markers: one splice, as given
    assert Splice(mode="inline").markers(plain) is None and len(own.tails(plain)) == 1
    assert own.to_dict(plain)["close_at"] == "every fork" and Splice(mode="inline").to_dict(plain)["close_at"] == "no fork"


def test_an_interrupt_splice_takes_no_close():
    import pytest

    from isokl_tl.splice import Splice

    with pytest.raises(ValueError, match="inline splice only"):
        Splice(mode="interrupt", close="</think>")
    assert Splice(mode="interrupt", close="").close_text(tiny_tokenizer()) == ""


def test_no_fork_within_reach_gives_an_empty_column_set():
    inside = open_at(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([[7, 8]]), [],
                     (OPEN, CLOSE))
    assert inside.shape == (1, 0)


def test_a_model_without_markers_reports_nothing():
    rollouts = SimpleNamespace(prompt=torch.ones(1, 2, dtype=torch.long), prompt_mask=torch.ones(1, 2, dtype=torch.long),
                               tokens=torch.ones(1, 3, dtype=torch.long))
    frame = pd.DataFrame({"row": [0], "fork": [0]})
    assert thinking_report(frame, rollouts, tiny_tokenizer(), {"mode": "inline", "close": ""}) is None
    assert np.array_equal(open_at(rollouts.prompt, rollouts.prompt_mask, rollouts.tokens, [0, 3], (OPEN, CLOSE)),
                          np.zeros((1, 2), bool))
