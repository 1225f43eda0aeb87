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
- `ray`: Ray actors, one per GPU of the cluster (cuda cells) or per CPU, each holding its GPU
  and running cells one after another with the model it loaded kept, on the cluster at
  `ray_address` or on a Ray started for the call (`pip install 'isokl-tl[ray]'`).
- `slurm`: a submitit job array, one cell a task (`Slurm` settings; `Slurm(local=True)` runs the
  array through submitit's local executor instead, `pip install 'isokl-tl[slurm]'`).
Each task runs `cells.run_cell`, as a local worker does, so a cell's files do not depend on the executor
(given the same number of threads per process).
"""

import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from isokl_tl.cells import one_line, run_cell
from isokl_tl.grid import Cell, GridState, finished

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


@dataclass(frozen=True)
class Slurm:
    """Settings of the `slurm` executor's job array (submitit)."""

    partition: str | None = None
    gpus: int = 1                 # per task (cells on cuda); 0 for CPU cells
    time: int = 240               # minutes per task
    cpus: int = 4                 # per task
    parallelism: int = 64         # array tasks at once
    local: bool = False           # submitit's local executor (subprocesses here), not Slurm


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
            _ray(todo, study, state, workers, ray_address, force, progress, log)
        else:
            _slurm(todo, study, state, slurm, force, progress, log)
    return state


class _Progress:
    """The grid's progress bar: cells done, running, failed, and the time left at this pace."""

    def __init__(self, total: int, state: GridState, progress: bool):
        self.bar = tqdm(total=total, desc="grid", unit="cell", disable=not progress)
        self.state, self.left, self.start, self.total = state, total, time.perf_counter(), total

    def finished(self, running: int) -> None:
        self.left -= 1
        self.bar.update(1)
        self.show(running)

    def show(self, running: int) -> None:
        done_now = self.total - self.left
        eta = (time.perf_counter() - self.start) / done_now * self.left if done_now else None
        self.bar.set_postfix_str(f"done {self.state.count('done')}, running {running}, failed "
                                 f"{self.state.count('failed')}" + (f", ~{eta:.0f}s left" if eta is not None else ""))

    def close(self) -> None:
        self.bar.close()


class _CellWorker:
    """A Ray actor holding one GPU (or one CPU) for its lifetime: it runs cells one after another
    and keeps the model it loaded last, as a local worker does (a Ray *task* on a GPU gets a fresh
    process each time: Ray does not reuse GPU task workers)."""

    def run(self, name: str, config: dict, cell_dir: str, threads: int | None, force: bool) -> tuple:
        return run_cell(name, config, cell_dir, threads, force)


def _ray(todo: list[Cell], study: Path, state: GridState, workers: int | None, address: str | None, force: bool,
         progress: bool, log) -> None:
    """One Ray actor per GPU of the cluster (cuda cells) or per CPU (`workers`, or the cluster's),
    each running cells from the queue; against `address`, or a Ray started here with `workers`
    CPUs (and the GPUs it sees). An actor that dies leaves its cell failed and another takes its
    place. Cells' results land in the study directory, which must be on a filesystem every node
    shares."""
    import ray

    cuda = any(c.config.device.startswith("cuda") for c in todo)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else (workers or os.cpu_count()),
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        have = ray.cluster_resources()
        if cuda and have.get("GPU", 0) < 1:
            raise ValueError("cells on cuda, but the Ray cluster has no GPU")
        threads = None if cuda else 1
        cpus = int(have.get("CPU", 0))
        # a GPU worker holds its GPU and no CPU (else CPUs short of GPUs would leave actors unscheduled)
        n = int(have["GPU"]) if cuda else min(workers or cpus, cpus)
        if n < 1:
            raise ValueError("the Ray cluster has no CPU to run a cell on")
        actor = ray.remote(num_gpus=1 if cuda else 0, num_cpus=0 if cuda else 1, max_restarts=0)(_CellWorker)
        waiting, busy = list(todo), {}

        def give(worker) -> None:
            if waiting:
                c = waiting.pop(0)
                ref = worker.run.remote(c.name, c.config.to_dict(), str(c.dir(study.resolve())), threads, force)
                busy[ref] = (worker, c.name)
                state.cells[c.name].update(state="running", error=None)
                state.save()

        for _ in range(min(n, len(todo))):
            give(actor.remote())
        log(f"[grid] {len(todo)} cells on {min(n, len(todo))} Ray worker(s) ({'1 GPU' if cuda else '1 CPU'} each)")
        bar = _Progress(len(todo), state, progress)
        try:
            while busy:
                ready, _ = ray.wait(list(busy), num_returns=1)
                for ref in ready:
                    worker, name = busy.pop(ref)
                    try:
                        what, error = ray.get(ref)
                    except ray.exceptions.RayActorError as e:     # the worker's process died
                        what, error, worker = "failed", one_line(e), actor.remote() if waiting else None
                    except Exception as e:
                        what, error = "failed", one_line(e)
                    state.set(name, what, error)
                    if what == "failed":
                        log(f"[grid] {name} failed: {error}")
                    if worker is not None:
                        give(worker)
                    bar.finished(len(busy))
        finally:
            bar.close()
    finally:
        if started:
            ray.shutdown()


def _slurm(todo: list[Cell], study: Path, state: GridState, s: Slurm, force: bool, progress: bool, log) -> None:
    """A submitit job array, one cell a task (submitit's local executor with `s.local`: every task
    at once, for tests and small grids). A task that runs out of time or is preempted leaves its
    cell failed with its saved parts; the next call resumes it. Logs in `STUDY_DIR/slurm/`."""
    import submitit

    folder = study / "slurm"
    cuda = any(c.config.device.startswith("cuda") for c in todo)
    if s.local:
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=s.time, gpus_per_node=s.gpus if cuda else 0)
    else:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        ex.update_parameters(timeout_min=s.time, slurm_partition=s.partition, gpus_per_node=s.gpus if cuda else 0,
                             cpus_per_task=s.cpus, slurm_array_parallelism=s.parallelism, name="isokl-tl-grid")
    threads = None if cuda else (1 if s.local else s.cpus)
    jobs = ex.map_array(run_cell, [c.name for c in todo], [c.config.to_dict() for c in todo],
                        [str(c.dir(study.resolve())) for c in todo], [threads] * len(todo), [force] * len(todo))
    for c in todo:
        state.cells[c.name].update(state="running", error=None)
    state.save()
    log(f"[grid] {len(todo)} cells as a job array ({'local' if s.local else 'slurm'}; job {jobs[0].job_id})")
    bar = _Progress(len(todo), state, progress)
    pending = dict(zip(jobs, (c.name for c in todo)))
    try:
        while pending:
            for job in [j for j in pending if j.done()]:
                name = pending.pop(job)
                try:
                    what, error = job.result()
                except Exception as e:              # the task died, timed out for good, was cancelled
                    what, error = "failed", one_line(e)
                state.set(name, what, error)
                if what == "failed":
                    log(f"[grid] {name} failed: {error}")
                bar.finished(len(pending))
            time.sleep(0.5)
    finally:
        bar.close()


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
    bar = _Progress(len(todo), state, progress)
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
