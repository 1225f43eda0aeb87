"""Running one cell of a study in this process, as every executor (`isokl_tl.executors`) does:
`Run(cell_dir, config).run_all()`, resuming from the cell's saved parts; a failure becomes one
line, with the traceback in the cell's directory."""

import traceback
from pathlib import Path

ERROR = "error.txt"          # a failed cell's traceback, in its run directory


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


_MODELS: dict = {}           # the model this process loaded last, for the cells it runs next


def run_cell(name: str, config: dict, cell_dir: str, threads: int | None = None, force: bool = False
             ) -> tuple[str, str | None]:
    """Run one cell in this process (`Run.run_all`, resuming from its saved parts): ("done", None),
    or ("failed", its one-line error) with the traceback in the cell's `error.txt`. The process
    keeps the model it loaded last for the cells it runs next (cells of the same model in a row
    load it once). With `force`, a cell directory made with other settings is overwritten."""
    import torch

    from isokl_tl.config import RunConfig
    from isokl_tl.models import load_model
    from isokl_tl.run import Run

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = RunConfig.from_dict(config)
        key = (cfg.model, cfg.device, cfg.dtype)
        if key not in _MODELS:
            _MODELS.clear()               # one model at a time: a grid across models would fill the GPU
            _MODELS[key] = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        Run(cell_dir, cfg, model=_MODELS[key], progress=False, log=lambda m: None, force=force).run_all()
    except Exception as e:            # the cell failed (its traceback in its directory)
        Path(cell_dir).mkdir(parents=True, exist_ok=True)
        (Path(cell_dir) / ERROR).write_text(traceback.format_exc())
        return "failed", one_line(e)
    (Path(cell_dir) / ERROR).unlink(missing_ok=True)
    return "done", None


