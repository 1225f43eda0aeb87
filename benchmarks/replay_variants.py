"""The captured decode step alone (one CUDA-graph replay per step, no scoring), for StaticDecoder
variants with one attribute changed, interleaved over repeats at the same cache fill: finer than
`ablate_gpu_step.py`, which times whole rollouts.

    python benchmarks/replay_variants.py --shape qwen2.5-0.5b
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import steered_model  # noqa: E402

# decoder attributes, or "module.NAME" constants of isokl_tl's modules (set while the variant's graph is captured)
VARIANTS = {"all on": {},
            "rotary + cache writes as their own kernel": {"rotate_in_attention": False},
            "attention tiles of session 4 (slice 128, block 32, 1 warp)": {
                "attn_triton.SLICE": 128, "attn_triton.BLOCK": 32, "attn_triton.WARPS": 1},
            "attention by SDPA over the whole cache": {"attention": None}}


def _set(attrs: dict, dec) -> dict:
    """Apply `attrs`; returns the module constants' old values."""
    import importlib
    old = {}
    for k, val in attrs.items():
        if "." in k:
            mod, name = k.split(".")
            mod = importlib.import_module(f"isokl_tl.{mod}")
            old[k] = getattr(mod, name)
            setattr(mod, name, val)
        else:
            setattr(dec, k, val)
    return old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--fill", type=int, default=300, help="keys in the cache when timing starts")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", nargs="*", default=None, help="besides 'all on', the variants whose names contain one of these")
    a = ap.parse_args()
    from isokl_tl.graph_decode import StaticDecoder

    model, tokens, steering = steered_model(a.shape)
    chosen = {k: v for k, v in VARIANTS.items() if k == "all on" or a.only is None or any(w in k for w in a.only)}
    decs = {}
    with torch.no_grad(), steering as s:
        for name, attrs in chosen.items():
            dec = StaticDecoder(model, s, a.fill + a.steps + 8)
            old = _set(attrs, dec)
            nxt = dec.prefill(tokens, torch.ones_like(tokens)).argmax(-1)
            for _ in range(a.fill - 48):
                dec.step(nxt)                            # captured at the second step
            _set(old, dec)
            decs[name] = (dec, nxt, dec.logits.clone())
        times = {k: [] for k in decs}
        for _ in range(a.repeats):
            for name, (dec, nxt, _) in decs.items():
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(a.steps):
                    dec.step(nxt)
                torch.cuda.synchronize()
                times[name].append(1000 * (time.perf_counter() - t) / a.steps)
                dec.length -= a.steps                    # back to the same fill
                dec.pos_ids -= a.steps
                dec.write_at -= a.steps
    first = next(iter(decs.values()))[2]
    for name, ts in times.items():
        same = torch.equal(decs[name][2], first)
        print(f"{name:45s} {sorted(ts)[len(ts) // 2]:.4f} ms/step (min {min(ts):.4f}; "
              f"logits at the fill identical to the first variant's: {same})", flush=True)


if __name__ == "__main__":
    main()
