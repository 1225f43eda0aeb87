"""How many rows a rollout's batch takes when the caller does not say (`rows_per_batch=None`).

On the CPU a decode step is compute-bound (the multiplies run at about the same rate whatever
the batch), so a batch keeps `CPU_ROWS` rows: more would only hold more memory. On a GPU a step
of a small model is bound by launches and weight reads, not arithmetic, so larger batches make
more tokens per second (BENCHMARKS.md, "Large batches": 2.3x the tokens/s at 256 rows as at 64,
2.7x at 512):
a batch takes as many rows as fit in `MEMORY_SHARE` of the memory the device has free, by
`row_bytes`, up to `GPU_ROWS`. Either way the rows are then spread evenly over the fewest
batches that hold them (300 rows at most 256 a batch: two batches of 150, not 256 + 44; both take
as many steps, and the smaller batch steps faster).
"""

import math

import torch
from transformer_lens import HookedTransformer

CPU_ROWS = 64
GPU_ROWS = 512          # beyond it the step grows about as fast as the batch: Qwen2.5-0.5B shape on an
                        # H200, 132k steered tokens/s at 512 rows, 143k at 1024 (BENCHMARKS.md)
MEMORY_SHARE = 0.5      # of the device memory free at the start of the rollout


def row_bytes(model: HookedTransformer, prompt_len: int, capacity: int, tail: int = 0) -> int:
    """An upper bound on the device memory one steered row takes with its base partner: both
    rows' keys and values for `capacity` positions at every layer, their logits and the scoring's
    float32 work over the vocabulary, and the widest activations of the prefill (`prompt_len`
    positions, attention scores included) or of a fork's `tail`, whichever is larger."""
    c = model.cfg
    elt = torch.empty(0, dtype=c.dtype).element_size()
    kv_heads = c.n_key_value_heads or c.n_heads
    cache = 2 * c.n_layers * kv_heads * c.d_head * capacity * elt
    vocab = c.d_vocab_out * (elt + 6 * 4)           # logits; log-softmax, probabilities, KL terms in float32
    d_mlp = c.d_mlp or 4 * c.d_model
    widest = max(prompt_len, tail)
    acts = widest * (6 * c.d_model + 3 * d_mlp) * elt + c.n_heads * widest * max(widest, capacity) * 4
    return 2 * (cache + vocab + acts)


def available_bytes(device: torch.device) -> int:
    """Memory a new batch can take on a CUDA device: what the driver has free plus what PyTorch
    holds in its cache unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def batch_rows(model: HookedTransformer, prompts: list[list[int]], window: int, tail: int = 0) -> int:
    """Rows per batch for a rollout of these prompts (one per row) over `window` tokens, with
    forks of `tail` tokens (and the token before them) if any; see the module docstring."""
    n_rows = len(prompts)
    if n_rows == 0:
        return 1
    device = torch.device(model.cfg.device)
    most = gpu_rows(model, prompts, window, tail, available_bytes(device)) if device.type == "cuda" else CPU_ROWS
    return math.ceil(n_rows / math.ceil(n_rows / most))


def gpu_rows(model: HookedTransformer, prompts: list[list[int]], window: int, tail: int, available: int) -> int:
    """The most rows a GPU batch takes with `available` bytes free (at least 1, at most `GPU_ROWS`)."""
    width = max(len(p) for p in prompts)
    need = row_bytes(model, width, width + window + tail + (1 if tail else 0), tail)
    return max(1, min(GPU_ROWS, int(MEMORY_SHARE * available // need)))
