"""What a user waits for before any work: importing the library and the CLI, and loading the
embedded model from its converted cache, each in a fresh process to its exit (median of `--repeats`); and,
for scale, what the libraries it stands on take to import alone (and torch to start CUDA). Each
keeps its bytecode where `isokl-tl` keeps it (`isokl_tl_cli.startup`), as a run's import does.

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
    # every case first keeps bytecode where the CLI keeps it (`isokl_tl_cli.startup`; a no-op where
    # Python may write it beside the sources), as `isokl-tl run` does before it imports anything
    cli = "from isokl_tl_cli.startup import bytecode_cache; bytecode_cache(); "
    load = f"from isokl_tl import load_model; load_model(device={a.device!r}, dtype={a.dtype!r})"
    fresh(cli + load)                                                          # fills the caches
    cases = {
        "python alone": "pass",
        "isokl-tl --help (the CLI, without the library)": "import isokl_tl_cli.main",
        # what any TransformerLens model costs before TransformerLens itself: torch, then the
        # transformers model classes TransformerLens imports (`transformers.modeling_utils`)
        "import torch": cli + "import torch",
        **({"import torch + CUDA initialised": cli + f"import torch; torch.zeros(1, device={a.device!r})"}
           if a.device != "cpu" else {}),
        "import torch + transformers.modeling_utils": cli + "import torch, transformers.modeling_utils",
        "import transformer_lens": cli + "import transformer_lens",
        "import isokl_tl": cli + "import isokl_tl",
        "import isokl_tl + load_model (cached)": cli + load,
        # as a command does: the library imported, then frozen (`import_library`), and the process
        # left without its teardown (`leave`); the cases above end the usual way
        "import isokl_tl + load_model, as a CLI command": cli + "from isokl_tl_cli.startup import import_library, leave; "
                                                      "import_library(); " + load + "; leave(0)",
    }
    for name, code in cases.items():
        secs = statistics.median(fresh(code) for _ in range(a.repeats))
        print(f"{name:50s} {secs:6.2f} s")


if __name__ == "__main__":
    main()
