"""Running a study's cells (`isokl_tl.grid`): each cell is `Run(cell_dir, config).run_all()`, the
same library code as `isokl-tl run`, so a cell killed mid-way resumes from its saved parts.

`run_grid` skips cells whose run directory is already complete, records every cell's state in
`grid.json` (a failed cell with its one-line error; the others go on), and reruns failed and
missing cells only when called again.

Executors:
- `local` (the default): worker processes started fresh (`spawn`), one per visible GPU
  with `CUDA_VISIBLE_DEVICES` set to it for cells on `cuda`, else `workers` CPU processes (each
  with its share of the cores). A worker keeps the model it loaded last, so cells of the same
  model in a row load it once. A worker that dies (killed, out of memory) leaves its cell
  `failed` with the reason; the cell's saved parts stay for the next call.
- `ray` and `slurm` (`isokl_tl.clusters`): Ray actors, one per GPU of the cluster (cuda cells)
  or per CPU, each keeping the model it loaded, on the cluster at `ray_address` or on a Ray
  started for the call (`pip install 'isokl-tl[ray]'`); a submitit job array, one cell a task
  (`Slurm` settings; `Slurm(local=True)` runs the array through submitit's local executor
  instead, `pip install 'isokl-tl[slurm]'`).
Each task runs `cells.run_cell`, as a local worker does, so a cell's files do not depend on the executor
(given the same number of threads per process).
"""

import multiprocessing as mp
import os
import queue
from pathlib import Path

from isokl_tl.cells import run_cell
from isokl_tl.clusters import Slurm, ray_cells, slurm_cells
from isokl_tl.grid import Cell, GridProgress, GridState, finished

EXECUTORS = ("local", "ray", "slurm")


def _worker(tasks, results, threads: int | None, force: bool) -> None:
    """A local worker process: run cells from `tasks` until None, reporting to `results`."""
    while True:
        item = tasks.get()
        if item is None:
            return
        name, config, cell_dir = item
        results.put((name, "running", None, os.getpid()))
        results.put((name, *run_cell(name, config, cell_dir, threads, force), os.getpid()))


def _gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _need(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"the {extra} executor needs {module}: pip install 'isokl-tl[{extra}]'") from None


def run_grid(cells: list[Cell], study: str | Path, *, executor: str = "local", workers: int | None = None,
             ray_address: str | None = None, slurm: Slurm = Slurm(), force: bool = False, progress: bool = True,
             log=print) -> GridState:
    """Run every cell not yet complete; returns the final states (also in `STUDY_DIR/grid.json`).
    With `force`, cell directories made with other direction settings are overwritten."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    if executor == "ray":
        _need("ray", "ray")
    if executor == "slurm":
        _need("submitit", "slurm")
    study = Path(study)
    state = GridState(study, cells)
    todo = []
    for c in cells:
        if finished(c, study):
            state.cells[c.name].update(state="done", error=None)
        else:
            state.cells[c.name].update(state="pending", error=None)
            todo.append(c)
    state.save()
    if len(todo) < len(cells):
        log(f"[grid] {len(cells) - len(todo)} of {len(cells)} cells complete already, skipped")
    if todo:
        if executor == "local":
            _local(todo, study, state, workers, force, progress, log)
        elif executor == "ray":
            ray_cells(todo, study, state, workers, ray_address, force, progress, log)
        else:
            slurm_cells(todo, study, state, slurm, force, progress, log)
    return state


def _local(todo: list[Cell], study: Path, state: GridState, workers: int | None, force: bool, progress: bool,
           log) -> None:
    cuda = any(c.config.device.startswith("cuda") for c in todo)
    gpus = _gpus() if cuda else []
    if cuda and not gpus:
        raise ValueError("cells on cuda, but this machine shows no CUDA device")
    n = min(len(todo), workers or (len(gpus) if cuda else 1))
    threads = None if cuda else max(1, (os.cpu_count() or 1) // n)
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for c in todo:
        config = c.config.to_dict()
        if gpus:                             # each worker sees its one GPU as cuda (cuda:N is another worker's)
            config["device"] = "cuda"
        tasks.put((c.name, config, str(c.dir(study))))
    procs = []
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for i in range(n):
            tasks.put(None)
            if gpus:                         # the child sees one GPU: set at its start, then restored
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            p = ctx.Process(target=_worker, args=(tasks, results, threads, force))    # not daemonic: draws figures in children
            p.start()
            procs.append(p)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    log(f"[grid] {len(todo)} cells on {n} worker(s)" + (f", GPUs {', '.join(gpus[:n])}" if gpus else ""))
    running: dict[int, str] = {}
    bar = GridProgress(len(todo), state, progress)
    try:
        while bar.left:
            try:
                name, what, error, pid = results.get(timeout=1.0)
            except queue.Empty:
                for p in procs:              # a worker gone mid-cell: that cell failed
                    if not p.is_alive() and p.pid in running:
                        state.set(running.pop(p.pid), "failed", f"the worker running it died (exit code {p.exitcode})")
                        bar.finished(len(running))
                if not any(p.is_alive() for p in procs) and bar.left:
                    for c in todo:
                        if state.cells[c.name]["state"] in ("pending", "running"):
                            state.set(c.name, "failed", "no worker left to run it")
                    break
                continue
            state.set(name, what, error)
            if what == "running":
                running[pid] = name
                bar.show(len(running))
                continue
            running.pop(pid, None)
            if what == "failed":
                log(f"[grid] {name} failed: {error}")
            bar.finished(len(running))
    finally:
        bar.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
