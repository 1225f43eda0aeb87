"""Running a study's cells (`isokl_tl.grid`): each cell is `Run(cell_dir, config).run_all()`, the
same library code as `isokl-tl run`, so a cell killed mid-way resumes from its saved parts.

`run_grid` skips cells whose run directory is already complete, records every cell's state in
`grid.json` (a failed cell with its one-line error; the others go on), and reruns failed and
missing cells only when called again.

Executors:
- `local` (the only one so far): worker processes started fresh (`spawn`), one per visible GPU
  with `CUDA_VISIBLE_DEVICES` set to it for cells on `cuda`, else `workers` CPU processes (each
  with its share of the cores). A failed cell's traceback is in its directory (`error.txt`). A worker keeps the models it has loaded, so cells of the same
  model load it once per worker. A worker that dies (killed, out of memory) leaves its cell
  `failed` with the reason; the cell's saved parts stay for the next call.
"""

import multiprocessing as mp
import os
import queue
import time
import traceback
from pathlib import Path

from tqdm.auto import tqdm

from isokl_tl.grid import Cell, GridState, finished

EXECUTORS = ("local",)
ERROR = "error.txt"          # a failed cell's traceback, in its run directory


def one_line(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _worker(tasks, results, threads: int | None) -> None:
    """A worker process: run cells from `tasks` until None, reporting to `results`."""
    import torch

    from isokl_tl.config import RunConfig
    from isokl_tl.models import load_model
    from isokl_tl.run import Run

    if threads:
        torch.set_num_threads(threads)
    models = {}
    while True:
        item = tasks.get()
        if item is None:
            return
        name, config, cell_dir = item
        results.put((name, "running", None, os.getpid()))
        try:
            cfg = RunConfig.from_dict(config)
            key = (cfg.model, cfg.device, cfg.dtype)
            if key not in models:
                models[key] = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
            Run(cell_dir, cfg, model=models[key], progress=False, log=lambda m: None).run_all()
        except Exception as e:        # the cell failed (its traceback in its directory); the worker goes on
            Path(cell_dir).mkdir(parents=True, exist_ok=True)
            (Path(cell_dir) / ERROR).write_text(traceback.format_exc())
            results.put((name, "failed", one_line(e), os.getpid()))
        else:
            (Path(cell_dir) / ERROR).unlink(missing_ok=True)
            results.put((name, "done", None, os.getpid()))


def _gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def run_grid(cells: list[Cell], study: str | Path, *, executor: str = "local", workers: int | None = None,
             progress: bool = True, log=print) -> GridState:
    """Run every cell not yet complete; returns the final states (also in `STUDY_DIR/grid.json`)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is not one of {', '.join(EXECUTORS)}")
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
        _local(todo, study, state, workers, progress, log)
    return state


def _local(todo: list[Cell], study: Path, state: GridState, workers: int | None, progress: bool, log) -> None:
    cuda = any(c.config.device.startswith("cuda") for c in todo)
    gpus = _gpus() if cuda else []
    if cuda and not gpus:
        raise ValueError("cells on cuda, but this machine shows no CUDA device")
    n = min(len(todo), workers or (len(gpus) if cuda else 1))
    threads = None if cuda else max(1, (os.cpu_count() or 1) // n)
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for c in todo:
        tasks.put((c.name, c.config.to_dict(), str(c.dir(study))))
    procs = []
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for i in range(n):
            tasks.put(None)
            if gpus:                         # the child sees one GPU: set at its start, then restored
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            p = ctx.Process(target=_worker, args=(tasks, results, threads))    # not daemonic: draws figures in children
            p.start()
            procs.append(p)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    log(f"[grid] {len(todo)} cells on {n} worker(s)" + (f", GPUs {', '.join(gpus[:n])}" if gpus else ""))
    running: dict[int, str] = {}
    left, start = len(todo), time.perf_counter()
    bar = tqdm(total=len(todo), desc="grid", unit="cell", disable=not progress)
    try:
        while left:
            try:
                name, what, error, pid = results.get(timeout=1.0)
            except queue.Empty:
                for p in procs:              # a worker gone mid-cell: that cell failed
                    if not p.is_alive() and p.pid in running:
                        name = running.pop(p.pid)
                        state.set(name, "failed", f"the worker running it died (exit code {p.exitcode})")
                        left -= 1
                        bar.update(1)
                if not any(p.is_alive() for p in procs) and left:
                    for c in todo:
                        if state.cells[c.name]["state"] in ("pending", "running"):
                            state.set(c.name, "failed", "no worker left to run it")
                    break
                continue
            state.set(name, what, error)
            if what == "running":
                running[pid] = name
            else:
                running.pop(pid, None)
                left -= 1
                bar.update(1)
                if what == "failed":
                    log(f"[grid] {name} failed: {error}")
            done, failed = state.count("done"), state.count("failed")
            elapsed = time.perf_counter() - start
            finished_now = len(todo) - left
            eta = elapsed / finished_now * left if finished_now else float("nan")
            bar.set_postfix_str(f"done {done}, running {len(running)}, failed {failed}, "
                                f"~{eta:.0f}s left" if finished_now else f"running {len(running)}")
    finally:
        bar.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
