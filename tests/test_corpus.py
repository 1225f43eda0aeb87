"""The delta_ce calibration statistic: cross-entropy rise on a text corpus, teacher-forced."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from isokl_tl_cli.main import main

from isokl_tl.calibrate import CalibrationSettings, calibrate
from isokl_tl.corpus import corpus_ids, delta_ce, token_ce
from isokl_tl.hooks import Site
from isokl_tl.prompts import load_corpus


def _ce_alone(model, ids, direction, coeff):
    """Cross-entropy of one unpadded passage under `h + coeff * v` at the direction's hook."""
    def hook(resid, hook):
        return resid + coeff * direction.vector.to(resid.dtype)

    with torch.no_grad(), model.hooks(fwd_hooks=[(direction.hook, hook)]):
        logits = model(torch.tensor([ids]))[0, :-1]
    return -torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_padded_batches_score_each_passage_as_alone_and_zero_is_the_base(tiny, tiny_direction):
    ids = corpus_ids(tiny.tokenizer, load_corpus()[:3])
    assert len({len(x) for x in ids}) > 1                    # passages of different lengths: padding
    coeffs = torch.tensor([0.0, 4.0, 8.0])
    site = Site(tiny_direction.hook, tiny_direction.vector)
    ce = token_ce(tiny, ids, coeffs, sites=[site], site=torch.zeros(3, dtype=torch.long), rows_per_batch=2)
    for i, x in enumerate(ids):
        row = ce[i][~ce[i].isnan()]
        assert len(row) == len(x) - 1
        torch.testing.assert_close(row, _ce_alone(tiny, x, tiny_direction, float(coeffs[i])), atol=1e-4, rtol=0)
    base = token_ce(tiny, ids, torch.zeros(3), sites=[site], site=torch.zeros(3, dtype=torch.long))
    d, mask = delta_ce(ce, base)
    assert (d[0][mask[0]] == 0).all() and mask.sum() == sum(len(x) - 1 for x in ids)
    assert np.abs(d[1][mask[1]]).max() > 1e-3                # steering changed the cross-entropy


def test_calibrating_delta_ce_hits_the_target_at_an_evaluated_coefficient(tiny, tiny_direction):
    ids = corpus_ids(tiny.tokenizer, load_corpus()[:4])
    cal = calibrate(tiny, tiny_direction, ids, CalibrationSettings(statistic="delta_ce", target=0.2, bootstrap=50))
    assert cal.converged and abs(cal.value / 0.2 - 1) <= cal.tol
    site = Site(tiny_direction.hook, tiny_direction.vector)
    zeros = torch.zeros(len(ids), dtype=torch.long)
    d, mask = delta_ce(token_ce(tiny, ids, torch.full((len(ids),), cal.c_star), sites=[site], site=zeros),
                       token_ce(tiny, ids, torch.zeros(len(ids)), sites=[site], site=zeros))
    assert float(d[mask].mean()) == pytest.approx(cal.value, rel=1e-4)
    assert cal.n_tokens == int(mask.sum()) and cal.interval is not None


def test_a_run_calibrated_by_delta_ce(tmp_path):
    import json

    out = tmp_path / "run"
    args = ["run", "--model", "tiny-random", "--window", "16", "--n-prompts", "2", "--n-calib", "3",
            "--fork-every", "8", "--keep-weak", "--bootstrap", "20", "--alphas", "0 1",
            "--statistic", "delta_ce", "--target-kl", "0.05", "--out", str(out)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["statistic"] == "delta_ce" and abs(cal["value"] / 0.05 - 1) <= cal["tol"]
    summary = (out / "summary.md").read_text()
    assert "mean rise in cross-entropy on the corpus" in summary and "of 3 `corpus` passages" in summary
    assert "calibration transfer" not in summary and not (out / "calibration_transfer.json").exists()
    bad = CliRunner().invoke(main, [*args[:-2], "--corpus", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "none.jsonl" in bad.output and "does not exist" in bad.output


def test_a_passage_too_short_to_predict_is_refused(tiny):
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        corpus_ids(tiny.tokenizer, ["", "Some words here."])
    assert np.all([len(x) >= 2 for x in corpus_ids(tiny.tokenizer, load_corpus())])
