"""A long stage's saved parts (`.partial/` in a run directory): the folder of one stage's parts,
keyed by the stage's settings and by the execution settings that cut them, and the test hook that
kills the process after a given part (to test that a killed run resumes)."""

import os
import shutil
import signal
from pathlib import Path

from isokl_tl.config import RunConfig
from isokl_tl.manifest import settings_hash

KILL_ENV = "ISOKL_TL_KILL_AFTER"   # test hook: "stage:part" makes the process SIGKILL itself there


def fault_point(stage: str, part: int) -> None:
    """SIGKILL this process if `KILL_ENV` names this stage and part."""
    if os.environ.get(KILL_ENV) == f"{stage}:{part}":
        os.kill(os.getpid(), signal.SIGKILL)


def parts_folder(run_dir: Path, cfg: RunConfig, stage: str, key: str, log=print) -> Path:
    """The folder of a stage's saved parts, keyed by its settings (`key`) and by the execution
    settings that cut the parts; parts of the same stage cut otherwise are dropped (with a line)."""
    cut = settings_hash({k: getattr(cfg, k) for k in RunConfig.EXECUTION})
    path = Path(run_dir) / ".partial" / f"{stage}-{key}-{cut}"
    for other in (Path(run_dir) / ".partial").glob(f"{stage}-*"):
        if other != path:
            n = sum(1 for _ in other.iterdir())
            if n:
                log(f"[{stage}] {n} saved part(s) were cut with other settings "
                    f"({', '.join(RunConfig.EXECUTION)}, or the stage's own); starting afresh")
            shutil.rmtree(other)
    path.mkdir(parents=True, exist_ok=True)
    return path
