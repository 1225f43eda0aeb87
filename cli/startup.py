"""Start-up: where the compiled bytecode of the library and of what it imports is kept, and what
the cyclic garbage collector scans once the library is in.

Python keeps each module's compiled bytecode (`__pycache__`) so that the next import reads it
instead of compiling the source again. Container images often switch writing it off
(`PYTHONDONTWRITEBYTECODE=1`) and ship packages without it; then every run compiles torch,
transformers and TransformerLens anew, about 2,400 modules: on the H200 machine measured here that
was 12 of the 18 s `import isokl_tl` took. In that case, and only then, the CLI keeps the bytecode
in its own cache directory (`sys.pycache_prefix`), never beside the sources, and a second run
reads it; it says so once, when it makes the directory. Processes the library starts itself are
left to their inherited settings. `ISOKL_TL_BYTECODE_CACHE=0` leaves Python's settings alone.

A command's process keeps the modules it imported to its end, so the CLI puts every object alive
after the library's import out of the collector's reach (`gc.freeze`): no later pass scans them
again, nor one in each forked figure worker. And at its end the process leaves as the interpreter
would (other threads joined, `atexit` handlers run, output flushed) but without tearing every
object down one by one, which took 1.5-2.4 s after a command that loaded the embedded model on a
2-core CPU: the operating system takes the memory back at once.

A command's process also keeps the memory it freed (`keep_freed_memory`). glibc's allocator hands
a large freed block back to the operating system, by default; the next tensor of that size is then
new memory, which the kernel zeroes page by page at its first write. A CPU run allocates and frees
tensors of a few to a few tens of megabytes in every block of every step, so the CLI asks glibc to
serve blocks up to 1 GiB from its own heap and not to give the heap's top back. On the 2-core CPU
that halved the main job's page faults (1.39-1.52 million to 0.78-0.79 million) and its stages took
61.5-66.3 s against 65.8-72.4 s (six alternating pairs of runs, four of them with these settings
given through `GLIBC_TUNABLES`), results unchanged; its peak memory went from 3.55 to 3.63 GB.
Memory once used stays with the process until it ends (a trim still happens when more than 2 GiB
lies free at the heap's top). Every process the command starts inherits the same settings
through `GLIBC_TUNABLES`: a grid's local workers, which is why they are there, and also the tools
the libraries run (Triton's `ptxas`, torch's compile workers, `nvidia-smi`); for a short-lived
tool that only means the memory it frees stays with it until it exits. Malloc settings of your
own in `GLIBC_TUNABLES` or `MALLOC_*_` are left alone (a notebook can ask for the same by starting
Python with `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=2147483647`).
"""

import atexit
import ctypes
import gc
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

import click


def bytecode_cache(environ=os.environ) -> Path | None:
    """Keep bytecode under `$ISOKL_TL_CACHE/pycache` (else the user cache dir's, the place
    `isokl_tl.models.converted.cache_dir` keeps converted weights; not imported here, since that
    would import torch) when writing it is switched off and the installed torch holds none (its
    package folder has no `__pycache__`); returns that directory, or None when nothing was changed."""
    if not sys.dont_write_bytecode or sys.pycache_prefix or environ.get("ISOKL_TL_BYTECODE_CACHE") == "0":
        return None
    torch = importlib.util.find_spec("torch")             # found, not imported
    if torch is None or torch.origin is None or (Path(torch.origin).parent / "__pycache__").is_dir():
        return None                                        # bytecode ships with the packages: reading it is allowed
    import platformdirs

    where = (Path(environ.get("ISOKL_TL_CACHE") or platformdirs.user_cache_dir("isokl-tl")) / "pycache").resolve()
    new = not where.is_dir()
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if new:
        print(f"isokl-tl: Python may not write compiled bytecode here (PYTHONDONTWRITEBYTECODE) and the "
              f"installed packages hold none, so it is kept in {where} from now on; "
              "ISOKL_TL_BYTECODE_CACHE=0 turns this off", file=sys.stderr)
    sys.pycache_prefix = str(where)
    sys.dont_write_bytecode = False
    return where


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # mallopt's parameters (malloc.h)


def keep_freed_memory(environ=os.environ) -> bool:
    """Where the C library is glibc and no malloc setting was given: blocks of up to 1 GiB come
    from the heap and the heap's top is kept (up to 2 GiB of free memory there; see the module
    docstring). Returns whether the settings were made. When they were, `GLIBC_TUNABLES` in
    `environ` carries them too, so that processes this one starts (a grid's workers) allocate so
    from their first block."""
    if sys.platform != "linux" or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "") or any(
            k.startswith("MALLOC_") and k.endswith("_") for k in environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return False                # another C library (musl): its own policy
    except OSError:
        return False
    # glibc before 2.35 refuses a threshold above 32 MiB: then blocks up to that come from the heap
    mapped = next((n for n in (1 << 30, 32 << 20) if libc.mallopt(M_MMAP_THRESHOLD, n)), None)
    top = 2**31 - 1
    if not (mapped and libc.mallopt(M_TRIM_THRESHOLD, top)):
        return False
    tunables = f"glibc.malloc.mmap_threshold={mapped}:glibc.malloc.trim_threshold={top}"
    environ["GLIBC_TUNABLES"] = ":".join(filter(None, [environ.get("GLIBC_TUNABLES"), tunables]))
    return True


def import_library() -> None:
    """Import the library with the collector off, then freeze what is alive before switching it
    back on (`isokl_tl` pauses it too, for notebooks, but switches it on before a freeze could
    follow): torch, transformers, TransformerLens and the library live as long as the process,
    and a full pass over them costs 0.1-0.3 s on a 2-core CPU. They are handed back at
    a normal exit (a traceback that escapes click, `main()` called in-process), so nothing is
    reported leaked."""
    if "isokl_tl" in sys.modules:
        return
    keep_freed_memory()             # before torch allocates anything
    collecting = gc.isenabled()
    gc.disable()
    try:
        import isokl_tl  # noqa: F401
    finally:
        gc.freeze()                 # before the collector runs again: no pass over the import at all
        if collecting:
            gc.enable()
    atexit.register(gc.unfreeze)


class LibraryCommand(click.Command):
    """A command that uses the library: imported once its options are parsed (so `--help`
    answers at once), before its body runs."""

    def invoke(self, ctx):
        import_library()
        return super().invoke(ctx)


def leave(code: object) -> NoReturn:
    """End the process with `code` (what `SystemExit` holds: None, a number, or a message for
    stderr and status 1) as the interpreter's own exit does, minus the teardown of its objects:
    every file the library writes is closed before its function returns."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()         # as the interpreter: thread exit callbacks (executors), then other threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):               # a closed pipe: nothing more can reach it
            pass
    os._exit(code or 0)
