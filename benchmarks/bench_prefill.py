"""The sweep's prefill with and without distinct-row sharing (`FastDecoder._distinct`): the main
job's 12 long-form prompts x 5 alphas (60 rows, 48 base partners) on the embedded model, one
prefill each way, alternating, after a warm-up.

    python benchmarks/bench_prefill.py [--device cuda --dtype bfloat16] [--repeats 3]
"""

import argparse
import statistics
import time

import torch

from isokl_tl import load_model, load_prompts, prompt_ids
from isokl_tl.engine import FastDecoder, GraphDecoder
from isokl_tl.hooks import default_layer, hook_name
from isokl_tl.rollout import rollout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model = load_model(device=a.device, dtype=a.dtype)
    hook = hook_name(default_layer(model))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.cfg.d_model, generator=g)
    ids = [prompt_ids(model.tokenizer, p) for p in load_prompts("longform")[:12]]
    alphas = [0.0, 0.5, 1.0, 2.0, 4.0]
    rows = [p for _ in alphas for p in ids]
    coeff = torch.tensor([50.0 * x for x in alphas for _ in ids])
    decoder = GraphDecoder if a.device.startswith("cuda") else FastDecoder
    shared = decoder._distinct
    times: dict[str, list[float]] = {"shared": [], "partners only": []}

    def timed(self, tokens, mask):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = base_prefill(self, tokens, mask)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        times[which].append(time.perf_counter() - t)
        return out

    base_prefill = decoder.prefill
    decoder.prefill = timed
    for i in range(1 + a.repeats):
        for which, rule in (("shared", shared), ("partners only", lambda self, tokens, mask: None)):
            decoder._distinct = rule
            rollout(model, rows, coeff, direction=v, hook=hook, window=1, decoder=decoder)
            if i == 0:
                times[which].clear()          # the warm-up: weight packing, kernels
    decoder._distinct, decoder.prefill = shared, base_prefill
    lengths = sorted(len(p) for p in ids)
    print(f"prefill of {len(rows)} rows (+{int((coeff != 0).sum())} partners), prompts of {lengths[0]}-{lengths[-1]} "
          f"tokens, {a.device} {a.dtype}, {hook}:")
    for which, ts in times.items():
        print(f"  {which:14s} {statistics.median(ts):.3f} s  (median of {len(ts)}: {', '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
    main()
