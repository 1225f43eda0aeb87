"""Executors that hand a study's cells to a cluster (`isokl_tl.executors.run_grid` picks one):
Ray actors that each hold a GPU (or a CPU) and run cells from a queue, keeping the model they
loaded, and a Slurm job array through submitit. Both run `cells.run_cell`, as a local worker does.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path

from isokl_tl.cells import one_line, run_cell
from isokl_tl.grid import Cell, GridProgress, GridState


@dataclass(frozen=True)
class Slurm:
    """Settings of the `slurm` executor's job array (submitit)."""

    partition: str | None = None
    gpus: int = 1                 # per task (cells on cuda); 0 for CPU cells
    time: int = 240               # minutes per task
    cpus: int = 4                 # per task
    parallelism: int = 64         # array tasks at once
    local: bool = False           # submitit's local executor (subprocesses here), not Slurm



class _CellWorker:
    """A Ray actor holding one GPU (or one CPU) for its lifetime: it runs cells one after another
    and keeps the model it loaded last, as a local worker does (a Ray *task* on a GPU gets a fresh
    process each time: Ray does not reuse GPU task workers)."""

    def run(self, name: str, config: dict, cell_dir: str, threads: int | None, force: bool) -> tuple:
        return run_cell(name, config, cell_dir, threads, force)


def ray_cells(todo: list[Cell], study: Path, state: GridState, workers: int | None, address: str | None, force: bool,
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
        bar = GridProgress(len(todo), state, progress)
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


def slurm_cells(todo: list[Cell], study: Path, state: GridState, s: Slurm, force: bool, progress: bool, log) -> None:
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
    bar = GridProgress(len(todo), state, progress)
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
