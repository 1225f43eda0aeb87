"""Where a whole cell's wall time goes, imports included: the cell through the CLI from a new
process under cProfile (after an unprofiled run that fills the caches), then the functions with the
most cumulative time, the library's own first.

    python benchmarks/profile_cell.py --cell headline --prompts eval [--top 40]

The profiler slows pure-Python code (imports, figures) more than GPU work; read the shares, and
take wall times from `time_to_result.py`.
"""

import argparse
import io
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_result import CELLS, run_cell  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=sorted(CELLS), default="headline")
    ap.add_argument("--top", type=int, default=40)
    a, extra = ap.parse_known_args()
    args = CELLS[a.cell] + extra
    with tempfile.TemporaryDirectory() as tmp:
        run_cell(args, Path(tmp) / "warm")                     # fills the caches, unprofiled
        prof = f"{tmp}/cell.prof"
        start = time.perf_counter()
        # the click group itself, not the script: the script leaves without the teardown, before
        # cProfile would write its file (the teardown it skips is then not in the profile either)
        code = (f"import cProfile, sys; from isokl_tl_cli.main import main; sys.argv = {['isokl-tl', 'run', *args, '--out', f'{tmp}/run']!r}; "
                f"cProfile.run('main(standalone_mode=False)', {prof!r})")
        subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"isokl-tl run {' '.join(args)}: {time.perf_counter() - start:.1f} s under the profiler")
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
        stats.print_stats(a.top)
        print(out.getvalue().split("\n", 6)[-1])
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(r"isokl_tl", a.top)
        print("the library's own functions:")
        print(out.getvalue().split("\n", 6)[-1])


if __name__ == "__main__":
    main()
