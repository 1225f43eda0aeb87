"""Rollout throughput on CPU: isokl-tl's engine (steered tokens + per-token KL against a base
partner) against TransformerLens's own `generate` with the same steering hook (tokens only).

    python benchmarks/bench_rollout.py --model smollm2-135m-instruct --batches 1 8 64 --window 32

Prints steered tokens/s for each batch size. Both decode greedily with a KV cache for exactly
`window` tokens (EOS ignored), from the same chat-rendered prompts, in the same process.
"""

import argparse
import time

import torch

from isokl_tl.chat import prompt_ids
from isokl_tl.directions import compute_direction
from isokl_tl.hooks import resolve_hook, steer
from isokl_tl.models import load_model
from isokl_tl.prompts import load_pairs, load_prompts
from isokl_tl.rollout import rollout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--window", type=int, default=32)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(a.model)
    d = compute_direction(model, load_pairs(), resolve_hook(model), "mean_diff")
    base = [prompt_ids(model.tokenizer, p) for p in load_prompts("calibration")]
    width = min(len(p) for p in base)
    base = [p[-width:] for p in base]  # equal lengths: TL generate gets no padding to handle
    coeff = 0.3 * d.resid_norm
    print(f"model {a.model}, window {a.window}, threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'isokl-tl tok/s':>15} {'TL generate tok/s':>18}")
    for b in a.batches:
        prompts = (base * (b // len(base) + 1))[:b]
        t0 = time.perf_counter()
        rollout(model, prompts, torch.full((b,), coeff), direction=d.vector, hook=d.hook,
                window=a.window, eos=[], rows_per_batch=b)
        ours = b * a.window / (time.perf_counter() - t0)
        tokens = torch.tensor(prompts)
        t0 = time.perf_counter()
        with torch.no_grad(), steer(model, d.hook, d.vector, coeff):
            model.generate(tokens, max_new_tokens=a.window, do_sample=False, stop_at_eos=False,
                           use_past_kv_cache=True, verbose=False)
        tl = b * a.window / (time.perf_counter() - t0)
        print(f"{b:>5} {ours:>15.1f} {tl:>18.1f}")


if __name__ == "__main__":
    main()
