"""Where a cached model load goes (`load_model`'s steps one by one, in this process after the
import), and the hash the run records of it.

    python benchmarks/bench_load.py [--device cuda --dtype bfloat16] [--model SPEC]
"""

import argparse
import time

import torch

from isokl_tl.engine import relayout_for_decode
from isokl_tl.manifest import model_identity
from isokl_tl.models import converted, loading


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=loading.EMBEDDED)
    a = ap.parse_args()
    dtype = loading.parse_dtype(a.dtype)
    loading.load_model(a.model, device=a.device, dtype=dtype)           # fills the cache
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    steps, t = [], time.perf_counter()

    def lap(name):
        nonlocal t
        sync()
        now = time.perf_counter()
        steps.append((name, now - t))
        t = now

    gguf = loading.PACKAGED[a.model]()
    lap("find the GGUF")
    cfg, sd, tokenizer = converted.load_gguf(gguf, loading.DEFAULT_N_CTX, dtype, a.device)
    lap("read the converted weights and tokenizer")
    model = loading._build(cfg, sd)
    lap("build the HookedTransformer (meta, then assign)")
    model = model.to(a.device, print_details=False).eval()
    lap("move to the device")
    relayout_for_decode(model)
    lap("relayout for decoding")
    model_identity(model)
    lap("hash the weights (manifest)")
    for name, secs in steps:
        print(f"{name:50s} {secs:6.3f} s")
    print(f"{'together':50s} {sum(s for _, s in steps):6.3f} s")


if __name__ == "__main__":
    main()
