"""Start-up: where the compiled bytecode of the library and of what it imports is kept.

Python keeps each module's compiled bytecode (`__pycache__`) so that the next import reads it
instead of compiling the source again. Container images often switch writing it off
(`PYTHONDONTWRITEBYTECODE=1`) and ship packages without it; then every run compiles torch,
transformers and TransformerLens anew, about 2,400 modules: on the H200 machine measured here that
was 12 of the 18 s `import isokl_tl` took. In that case, and only then, the CLI keeps the bytecode
in its own cache directory (`sys.pycache_prefix`), never beside the sources, and a second run
reads it; it says so once, when it makes the directory. Processes the library starts itself are
left to their inherited settings. `ISOKL_TL_BYTECODE_CACHE=0` leaves Python's settings alone.
"""

import importlib.util
import os
import sys
from pathlib import Path


def bytecode_cache(environ=os.environ) -> Path | None:
    """Keep bytecode under `$ISOKL_TL_CACHE/pycache` (else the user cache dir's, the place
    `isokl_tl.models.loading.cache_dir` keeps converted weights; not imported here, since that
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
