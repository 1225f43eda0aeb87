"""How many rows a rollout's batch takes when the caller does not say (`rows_per_batch=None`).

On the CPU a decode step is compute-bound (the multiplies run at about the same rate whatever
the batch), so a batch keeps at most `CPU_ROWS` rows: more would only hold more memory. On a GPU a step
of a small model is bound by launches and weight reads, not arithmetic, so larger batches make
more tokens per second (BENCHMARKS.md, "Large batches": 2.3x the tokens/s at 256 rows as at 64,
2.7x at 512):
a batch takes as many rows as fit in `MEMORY_SHARE` of the device's memory beyond the model's
weights, by `row_bytes`, up to `GPU_ROWS`. That is the device's total memory, not what is free at
the moment (which depends on the decoders `engine.pool` keeps from earlier rollouts), so that a
run resumed later picks the same number and its saved parts stay valid; the share leaves room
for the kept decoders, and `row_bytes` is itself an upper bound (1.3-1.8x the peak measured on an
H200, BENCHMARKS.md). Either way the rows are then spread evenly over the fewest
batches that hold them (300 rows at most 256 a batch: two batches of 150, not 256 + 44; both take
as many steps, and the smaller batch steps faster).
"""

import math

import torch
from transformer_lens import HookedTransformer

from isokl_tl.engine.decoder import ReferenceDecoder
from isokl_tl.engine.paths import decode_path

CPU_ROWS = 64
GPU_ROWS = 512          # beyond it the step grows about as fast as the batch: Qwen2.5-0.5B shape on an
                        # H200, 132k steered tokens/s at 512 rows, 143k at 1024 (BENCHMARKS.md)
MEMORY_SHARE = 0.3      # of the device's memory beyond the weights


def row_bytes(model: HookedTransformer, prompt_len: int, capacity: int, tail: int = 0,
              full_logits: bool = False) -> int:
    """An upper bound on the device memory one steered row takes with its base partner: both
    rows' keys and values for `capacity` positions at every layer, their logits and the scoring's
    float32 work over the vocabulary, and the widest activations of the prefill (`prompt_len`
    positions, attention scores included) or of a fork's `tail`, whichever is larger;
    `full_logits`: the decoder computes logits at every position of the prefill (TransformerLens's
    own forward, the reference decoder)."""
    c = model.cfg
    elt = torch.empty(0, dtype=c.dtype).element_size()
    kv_heads = c.n_key_value_heads or c.n_heads
    cache = 2 * c.n_layers * kv_heads * c.d_head * capacity * elt
    vocab = c.d_vocab_out * (elt + 6 * 4)           # logits; log-softmax, probabilities, KL terms in float32
    d_mlp = c.d_mlp or 4 * c.d_model
    widest = max(prompt_len, tail)
    acts = widest * (6 * c.d_model + 3 * d_mlp) * elt + c.n_heads * widest * max(widest, capacity) * 4
    if full_logits:
        acts += prompt_len * c.d_vocab_out * (elt + 4)
    return 2 * (cache + vocab + acts)


def budget_bytes(model: HookedTransformer) -> int:
    """The memory a GPU batch may take: `MEMORY_SHARE` of the device's total beyond the weights."""
    _, total = torch.cuda.mem_get_info(torch.device(model.cfg.device))
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    return int(MEMORY_SHARE * max(0, total - weights))


def batch_rows(model: HookedTransformer, prompts: list[list[int]], window: int, tail: int = 0) -> int:
    """Rows per batch for a rollout of these prompts (one per row) over `window` tokens, with
    forks of `tail` tokens (and the token before them) if any; see the module docstring."""
    n_rows = len(prompts)
    if n_rows == 0:
        return 1
    device = torch.device(model.cfg.device)
    most = gpu_rows(model, prompts, window, tail, budget_bytes(model)) if device.type == "cuda" else CPU_ROWS
    return math.ceil(n_rows / math.ceil(n_rows / most))


def gpu_rows(model: HookedTransformer, prompts: list[list[int]], window: int, tail: int, budget: int) -> int:
    """The most rows a GPU batch takes within `budget` bytes (at least 1, at most `GPU_ROWS`)."""
    width = max(len(p) for p in prompts)
    full = decode_path(model).decoder is ReferenceDecoder
    need = row_bytes(model, width, width + window + tail + (1 if tail else 0), tail, full_logits=full)
    return max(1, min(GPU_ROWS, budget // need))
