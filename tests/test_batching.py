"""How many rows a batch takes when the caller does not say (`engine.batch_rows`)."""

import pytest
import torch

from isokl_tl.config import RunConfig
from isokl_tl.engine import batching, batch_rows
from isokl_tl.rollout import rollout


def test_cpu_batches_keep_64_rows_spread_evenly(tiny):
    p = [[1, 2, 3]]
    assert batch_rows(tiny, p * 10, window=8) == 10
    assert batch_rows(tiny, p * 64, window=8) == 64
    assert batch_rows(tiny, p * 65, window=8) == 33            # two batches of 33 and 32, not 64 + 1
    assert batch_rows(tiny, p * 300, window=8) == 60           # five of 60


def test_gpu_rows_follow_the_free_memory(tiny):
    p = [[1] * 40]
    need = batching.row_bytes(tiny, 40, 40 + 64, 0)
    assert batching.gpu_rows(tiny, p, 64, 0, budget=20 * need + need // 2) == 20
    assert batching.gpu_rows(tiny, p, 64, 0, budget=0) == 1
    assert batching.gpu_rows(tiny, p, 64, 0, budget=10**15) == batching.GPU_ROWS
    # longer windows, prompts and fork tails need more per row
    assert batching.row_bytes(tiny, 40, 600, 0) > batching.row_bytes(tiny, 40, 104, 0)
    assert batching.row_bytes(tiny, 400, 464, 0) > batching.row_bytes(tiny, 40, 464, 0)
    assert batching.row_bytes(tiny, 40, 464, 37) >= batching.row_bytes(tiny, 40, 464, 0)
    # TransformerLens's own forward holds the prefill's logits at every position
    assert batching.row_bytes(tiny, 40, 104, 0, full_logits=True) - batching.row_bytes(tiny, 40, 104, 0) >= \
        2 * 40 * tiny.cfg.d_vocab * 4


def test_a_rollout_left_to_pick_its_batches_equals_one_told(tiny, tiny_direction):
    prompts = [[5, 6, 7], [8, 9]] * 40
    coeffs = torch.linspace(0, 8, 80)
    kw = dict(direction=tiny_direction.vector, hook=tiny_direction.hook, window=6)
    picked = rollout(tiny, prompts, coeffs, **kw)
    told = rollout(tiny, prompts, coeffs, rows_per_batch=40, **kw)    # what the engine picks for 80 rows
    assert torch.equal(picked.tokens, told.tokens)
    torch.testing.assert_close(picked.kl, told.kl, equal_nan=True)


def test_run_config_takes_auto_or_a_positive_number():
    assert RunConfig().rows_per_batch == "auto" and RunConfig().batch_rows is None
    assert RunConfig(rows_per_batch=8).batch_rows == 8
    for bad in (0, -3, "many", True):
        with pytest.raises(ValueError, match="rows-per-batch must be a positive number or auto"):
            RunConfig(rows_per_batch=bad)
