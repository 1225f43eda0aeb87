"""Answer correctness at forks: scoring against the known answers, flips, the per-alpha table,
and the shipped held-out set's balance."""

import pandas as pd
import pytest

from isokl_tl.answers import answer_table, answers_markdown, flip_deaths, score_forks
from isokl_tl.prompts import known_answers, load_prompts


def _pmass(rows):
    return pd.DataFrame(rows, columns=["row", "prompt", "alpha", "coeff", "fork", "pmass", "p_true", "argmax"])


def test_forks_are_scored_against_the_known_answer_and_flips_need_a_right_baseline():
    pm = _pmass([
        # prompt 0 (answer true): right unsteered; at alpha 2 wrong from fork 8 on
        (0, 0, 0.0, 0.0, 0, 0.7, 0.9, 1), (0, 0, 0.0, 0.0, 8, 0.7, 0.8, 1),
        (2, 0, 2.0, 9.0, 0, 0.7, 0.6, 1), (2, 0, 2.0, 9.0, 8, 0.5, 0.2, 2),
        # prompt 1 (answer false): wrong unsteered, so a wrong steered answer is no flip
        (1, 1, 0.0, 0.0, 0, 0.7, 0.9, 1), (1, 1, 0.0, 0.0, 8, 0.7, 0.9, 1),
        (3, 1, 2.0, 9.0, 0, 0.7, 0.9, 1), (3, 1, 2.0, 9.0, 8, 0.5, 0.1, 2),
        # prompt 2: no known answer, dropped
        (4, 2, 0.0, 0.0, 0, 0.7, 0.9, 1),
    ])
    answers = [True, False, None]
    scored = score_forks(pm, answers).set_index(["row", "fork"])
    assert 4 not in scored.index.get_level_values("row")
    assert list(scored.loc[2].correct) == [True, False] and list(scored.loc[2].flipped) == [False, True]
    assert list(scored.loc[3].correct) == [False, True] and not scored.loc[3].flipped.any()
    table = answer_table(pm, answers).set_index("alpha")
    assert table.loc[0.0, "accuracy_fork0"] == 0.5 and table.loc[0.0, "says_true"] == 1.0
    # of alpha 2's rollouts only prompt 0's can flip (prompt 1 is wrong unsteered), and it does
    assert table.loc[2.0, "flipped"] == 1.0 and table.loc[2.0, "accuracy_last"] == 0.5
    assert table.loc[0.0, "flipped"] == 0.0
    none_right = answer_table(pm, [False, False, None]).set_index("alpha")     # the unsteered model right on none
    assert none_right.flipped.isna().all() and "| n/a |" in answers_markdown(answer_table(pm, [False, False, None]), [False, False, None])
    text = answers_markdown(answer_table(pm, answers), answers)
    assert "(1 true, 1 false)" in text and "right answer on 50% at fork 0" in text
    assert "no better than always answering one way" in text
    # as a death: row 2 flips at fork 8; row 0 (unsteered, right) is censored at its last fork;
    # rows of prompt 1 (wrong unsteered) and prompt 2 (no answer) cannot flip and are left out
    flips = flip_deaths(pm, answers).set_index("row")
    assert sorted(flips.index) == [0, 2]
    assert (flips.loc[2, "time"], flips.loc[2, "event"]) == (8, True)
    assert (flips.loc[0, "time"], flips.loc[0, "event"]) == (8, False)


def test_known_answers_follow_the_prompt_order(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "Is ice cold?", "answer": true}\n{"prompt": "Tell me a story."}\n'
                 '{"question": "Is fire cold?", "answer": false}\n')
    assert known_answers(f) == [True, None, False] and len(load_prompts(f)) == 3


@pytest.mark.parametrize("name,size", [("eval", 48), ("longform", 64)])
def test_every_even_prefix_of_a_shipped_question_set_is_balanced(name, size):
    """--n-prompts takes a prefix: any even one holds as many true questions as false ones."""
    answers = known_answers(name)
    assert len(answers) == size and None not in answers
    for n in range(2, len(answers) + 1, 2):
        assert sum(answers[:n]) == n // 2, n


def test_longform_prompts_carry_their_own_instruction():
    from isokl_tl.prompts import EVAL_INSTRUCTION

    long, short = load_prompts("longform"), load_prompts("eval")
    assert all("at least four paragraphs" in p for p in long) and not any("four paragraphs" in p for p in short)
    assert all(p.endswith(EVAL_INSTRUCTION) for p in short)
