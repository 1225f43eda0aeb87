"""`isokl-tl grid`: run a study (a grid of cells) and write its report; `isokl-tl grid report`."""

from pathlib import Path

import click
from isokl_tl_cli.errors import FORCE, user_errors
from isokl_tl_cli.startup import LibraryCommand, import_library


@click.group("grid", invoke_without_command=True)
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="The grid file: [shared] settings, [axes] to cross, optional [[exclude]] (docs/studies.md).")
@click.option("--out", "out", default=None, help="The study directory: cells/, grid.json, report.csv/.md/.png.")
@click.option("--dry-run", is_flag=True, help="List the cells and whether each is complete; run nothing.")
@click.option("--executor", type=click.Choice(("local", "ray", "slurm")), default="local", show_default=True,
              help="What runs the cells: local worker processes (one per visible GPU for cuda cells), Ray actors "
                   "(one per GPU; pip install 'isokl-tl[ray]'), or a Slurm job array through submitit ('isokl-tl[slurm]').")
@click.option("--workers", type=int, default=None,
              help="Local: worker processes [default: one per visible GPU for cuda cells, else 1]; Ray started "
                   "here: its CPUs [default: all].")
@click.option("--ray-address", default=None, help="Ray: the cluster to use [default: a Ray started for the grid].")
@click.option("--slurm-partition", default=None, help="Slurm: the partition [default: the cluster's].")
@click.option("--slurm-gpus", type=int, default=1, show_default=True, help="Slurm: GPUs per task (cuda cells).")
@click.option("--slurm-time", type=int, default=240, show_default=True, help="Slurm: minutes per task.")
@click.option("--slurm-cpus", type=int, default=4, show_default=True, help="Slurm: CPUs per task.")
@click.option("--slurm-parallelism", type=int, default=64, show_default=True, help="Slurm: array tasks at once.")
@click.option("--slurm-local", is_flag=True,
              help="Run the job array through submitit's local executor (no Slurm; every task at once).")
@FORCE
@click.pass_context
@user_errors
def grid_cmd(ctx, config, out, dry_run, executor, workers, ray_address, slurm_partition, slurm_gpus, slurm_time,
             slurm_cpus, slurm_parallelism, slurm_local, force) -> None:
    """Run a study: a grid of cells (each an ordinary run directory) and its report.

    `isokl-tl grid --config grid.toml --out STUDY` runs every cell not yet complete (a rerun skips
    finished cells and retries failed ones), then writes the report; `isokl-tl grid report STUDY`
    writes the report alone."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None or out is None:
        raise click.UsageError("give --config GRID_FILE and --out STUDY_DIR (or: isokl-tl grid report STUDY_DIR)")
    import_library()                # a group, not a LibraryCommand: its subcommand may be what runs
    from isokl_tl.grid import Grid, finished

    cells = Grid.from_toml(config).cells()
    if dry_run:
        for c in cells:
            click.echo(f"{c.name:40s} {'complete' if finished(c, out) else 'to run'}")
        click.echo(f"{len(cells)} cells")
        return
    from isokl_tl.executors import Slurm, run_grid
    from isokl_tl.study import write_report

    slurm = Slurm(partition=slurm_partition, gpus=slurm_gpus, time=slurm_time, cpus=slurm_cpus,
                  parallelism=slurm_parallelism, local=slurm_local)
    state = run_grid(cells, out, executor=executor, workers=workers, ray_address=ray_address, slurm=slurm,
                     force=force, log=lambda m: click.echo(m, err=True))
    table = write_report(out)
    click.echo(f"{state.count('done')} done, {state.count('failed')} failed of {len(cells)} cells; "
               f"report: {Path(out) / 'report.md'} ({len(table)} rows)")
    if state.count("failed"):
        for name, c in state.cells.items():
            if c["state"] == "failed":
                click.echo(f"  {name}: {c['error']}", err=True)
        ctx.exit(1)


@grid_cmd.command("report", cls=LibraryCommand)
@click.argument("study", type=click.Path(file_okay=False))
@user_errors
def grid_report_cmd(study) -> None:
    """Write a study's report (report.csv, report.md, report.png) from its finished cells."""
    from isokl_tl.study import write_report

    table = write_report(study)
    click.echo(f"{Path(study) / 'report.md'}: {len(table)} rows")
