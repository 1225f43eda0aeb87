"""What a user waits for before any work: importing the library and the CLI, and loading the
embedded model from its converted cache, each in a fresh process (median of `--repeats`); and,
for scale, what the libraries it stands on take to import alone.

    python benchmarks/bench_startup.py [--device cuda --dtype bfloat16]
"""

import argparse
import statistics
import subprocess
import sys
import time


def fresh(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    fresh(f"from isokl_tl import load_model; load_model(device={a.device!r}, dtype={a.dtype!r})")  # fills the cache
    cases = {
        "python alone": "pass",
        "isokl-tl --help (the CLI, without the library)": "import isokl_tl_cli.main",
        # what any TransformerLens model costs before TransformerLens itself: torch, then the
        # transformers model classes TransformerLens imports (`transformers.modeling_utils`)
        "import torch": "import torch",
        "import torch + transformers.modeling_utils": "import torch, transformers.modeling_utils",
        "import transformer_lens": "import transformer_lens",
        "import isokl_tl": "import isokl_tl",
        # the CLI first keeps bytecode in its cache where none may be written (isokl_tl_cli.startup)
        "the CLI, then import isokl_tl": "import isokl_tl_cli.main, isokl_tl",
        "import isokl_tl + load_model (cached)": f"from isokl_tl import load_model; "
                                                  f"load_model(device={a.device!r}, dtype={a.dtype!r})",
    }
    for name, code in cases.items():
        secs = statistics.median(fresh(code) for _ in range(a.repeats))
        print(f"{name:50s} {secs:6.2f} s")


if __name__ == "__main__":
    main()
