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
    tok, kl, lp, agree = greedy_scores_torch(x, BASE)
    assert torch.equal(tok, x[:4].argmax(-1)) and tok[2:].tolist() == [17, 200]
    torch.testing.assert_close(kl, token_kl(x[:4], x[BASE]))
    assert float(kl[1]) == 0 and float(kl[2]) == 0
    torch.testing.assert_close(lp, torch.log_softmax(x[:4], -1).gather(-1, tok[:, None])[:, 0])
    assert torch.equal(agree, x[BASE].argmax(-1) == tok)
