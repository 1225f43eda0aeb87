import pytest
import torch

from isokl_tl.engine.scoring import greedy_scores_torch
from isokl_tl.kl import token_kl


def _logits(rows=7, vocab=5000, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(rows, vocab, generator=g)
    x[5] = x[1]                       # row 1's partner equals it: KL exactly 0
    x[2, 17] = x[2, 4000] = x[2].max() + 1   # ties: the first maximum is the argmax
    x[3, 200] = x[3, 300] = x[3].max() + 1
    return x.to(dtype)


BASE = torch.tensor([4, 5, 2, 6])    # rows 0, 1, 3 have partners; row 2 is its own base


def test_torch_scores_match_the_definitions():
    x = _logits()
    tok, kl, lp, agree, blp = greedy_scores_torch(x, BASE)
    assert torch.equal(tok, x[:4].argmax(-1)) and tok[2:].tolist() == [17, 200]
    torch.testing.assert_close(kl, token_kl(x[:4], x[BASE]))
    assert float(kl[1]) == 0 and float(kl[2]) == 0
    torch.testing.assert_close(lp, torch.log_softmax(x[:4], -1).gather(-1, tok[:, None])[:, 0])
    assert torch.equal(agree, x[BASE].argmax(-1) == tok)
    torch.testing.assert_close(blp, torch.log_softmax(x[BASE], -1).gather(-1, tok[:, None])[:, 0])
    assert torch.equal(blp[2], lp[2])                 # a row that is its own base


def test_sampling_inverts_each_rows_distribution_at_its_own_draw():
    """`choose` maps a row's uniform number through its (tempered, nucleus-cut) CDF: over evenly
    spread draws the tokens come in the model's proportions, and a row's token does not depend on
    the other rows."""
    import torch

    from isokl_tl.engine.scoring import Sampling, choose

    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    u = (torch.arange(10_000) + 0.5) / 10_000
    got = choose(probs.log().expand(len(u), -1), Sampling(temperature=1.0), u)
    freq = torch.bincount(got, minlength=4) / len(u)
    torch.testing.assert_close(freq, probs, atol=1e-3, rtol=0)
    nucleus = choose(probs.log().expand(len(u), -1), Sampling(temperature=1.0, top_p=0.65), u)
    assert set(nucleus.tolist()) == {2, 3}                 # 0.6 and 0.3 reach 0.65: 0.1 is cut
    both = choose(torch.stack([probs.log(), probs.flip(0).log()]), Sampling(temperature=1.0), torch.tensor([0.05, 0.95]))
    alone = choose(probs.log()[None], Sampling(temperature=1.0), torch.tensor([0.05]))
    assert both[0] == alone[0] == 0 and both[1] == 3


def test_first_max_is_argmax_ties_included():
    from isokl_tl.engine.scoring import first_max

    x = _logits(rows=9, vocab=49_152)
    x[6] = (x[6] * 2).round() / 2                     # many ties at every value
    x[7, 3] = x[7, 9] = float("nan")                   # a NaN is the largest value
    assert torch.equal(first_max(x), x.argmax(-1)) and first_max(x)[2] == 17 and first_max(x)[7] == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_logit_names_its_row(bad):
    """`check_finite` first checks each row's sum, then the logits of rows whose sum is not finite;
    one bad logit among 50,000 names its row, steered or base partner, and finite logits whose sum
    overflows float32 pass."""
    from isokl_tl.engine.loop import check_finite

    rows, has, coeff = torch.tensor([4, 7, 9]), torch.tensor([0, 2]), torch.arange(10.0)
    x = torch.randn(5, 50_000)
    check_finite(x, 3, rows, has, coeff)
    huge = torch.full((5, 50_000), 3e38)
    assert not torch.isfinite(huge.sum(-1)).any()
    check_finite(huge, 3, rows, has, coeff)
    y = x.clone()
    y[1, 31_337] = bad
    with pytest.raises(ValueError, match=r"generated token 3 of row 7 \(steered, coefficient 7"):
        check_finite(y, 3, rows, has, coeff)
    y = x.clone()
    y[4, 5] = bad
    with pytest.raises(ValueError, match="token 3 in the base partner of row 9"):
        check_finite(y, 3, rows, has, coeff)
