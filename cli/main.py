"""`isokl-tl`: a thin click shell over the isokl_tl library. Commands import the library when they
run, so `--help` and `--version` answer at once."""

import os
from importlib import metadata
from pathlib import Path

import click
from isokl_tl_cli.errors import FORCE, user_errors
from isokl_tl_cli.grid import grid_cmd
from isokl_tl_cli.options import (
    calibration_options,
    direction_options,
    given,
    hook_options,
    model_options,
    out_option,
    pmass_options,
    rows_per_batch_option,
    survival_options,
    sweep_options,
)
from isokl_tl_cli.startup import LibraryCommand, bytecode_cache, leave

os.environ.setdefault("MPLBACKEND", "Agg")      # figures are files; no window, whatever the machine


def _version() -> str:
    try:
        return metadata.version("isokl-tl")
    except metadata.PackageNotFoundError:
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="isokl-tl")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Iso-KL calibrated steering on TransformerLens models: directions, calibration, long
    rollouts with per-token KL, fork pmass and Kaplan-Meier survival."""
    bytecode_cache()                            # before any command imports the library


main.command_class = LibraryCommand                # each command imports the library before its body


def open_run(out: str, options: dict, config: str | None = None, force: bool = False, existing: bool = False):
    """The `Run` at `out` (with `existing`: made by an earlier command). Settings, strongest
    first: the options given, the `--config` file, the run directory's saved config,
    `RunConfig`'s defaults; one line says when saved ones were reused."""
    from isokl_tl.config import RunConfig, read_toml
    from isokl_tl.manifest import MANIFEST, Manifest
    from isokl_tl.run import Run

    if existing and not (Path(out) / MANIFEST).is_file():
        raise ValueError(f"run directory {out!r} does not exist or holds no run; make it with "
                         "`isokl-tl run`, `direction` or `calibrate`")
    saved = Manifest(out).data.get("config", {})
    from_file = read_toml(config) if config else {}
    cfg = RunConfig.from_dict({**saved, **from_file, **options})
    if saved:
        kept = sorted(k for k in saved if k not in from_file and k not in options
                      and saved[k] != RunConfig().to_dict()[k])
        if kept:
            click.echo(f"reusing the settings saved in {out}: {', '.join(kept)}", err=True)
    return Run(out, cfg, log=lambda m: click.echo(m, err=True), force=force)


@main.command()
def models() -> None:
    """List the model specs that --model accepts."""
    from isokl_tl.models import MODEL_SPECS

    for spec, what in MODEL_SPECS.items():
        click.echo(f"{spec:24s} {what}")


@main.command("check-model")
@click.argument("spec", required=False)
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cpu or cuda.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Weight and activation dtype.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@user_errors
def check_model_cmd(spec, device, dtype, as_json) -> None:
    """Load SPEC (default: the embedded model) and say what a run will get: its architecture, hook
    points, default hook, decode path (and why, when it is TransformerLens's own forward), and the
    decode path's max |logit difference| from TransformerLens's forward on a short steered
    sequence."""
    import json

    from isokl_tl.inputs import check_device
    from isokl_tl.model_check import check_model
    from isokl_tl.models import EMBEDDED

    check_device(device)
    report = check_model(spec or EMBEDDED, device=device, dtype=dtype)
    click.echo(json.dumps(report.to_dict()) if as_json else report.to_text())


@main.command()
@model_options
@hook_options
@direction_options
@FORCE
@out_option
@user_errors
def direction(out, force, **kw) -> None:
    """Build a steering direction and save it into a run directory."""
    run = open_run(out, given(**kw), force=force)
    run.check(("direction",))
    run.begin()
    d = run.direction()
    click.echo(f"{d.method} direction at {d.hook}: raw norm {d.raw_norm:.3g}, projection gap "
               f"{d.projection_gap:.3g}, median residual norm {d.resid_norm:.3g} -> {out}")


@main.command("calibrate")
@model_options
@hook_options
@direction_options
@calibration_options
@rows_per_batch_option
@FORCE
@out_option
@user_errors
def calibrate_cmd(out, force, **kw) -> None:
    """Find the iso-KL coefficient c* (builds or reuses the run's direction)."""
    from isokl_tl.calibrate import statistic_label

    run = open_run(out, given(**kw), force=force)
    run.check(("direction", "calibrate"))
    run.begin()
    cal = run.calibrate()
    ci = f"  90% interval [{cal.interval[0]:.4g}, {cal.interval[1]:.4g}]" if cal.interval else ""
    click.echo(f"c* = {cal.c_star:.4g}{ci}  ({statistic_label(cal)} = {cal.value:.4g} nat, "
               f"target {cal.target:g} nat, {cal.rounds} rounds, converged {cal.converged})")


@main.command("rollout")
@out_option
@sweep_options
@user_errors
def rollout_cmd(out, **kw) -> None:
    """Roll out the held-out sweep (coefficient = alpha x c*) and save tokens, per-token KL, texts."""
    run = open_run(out, given(**kw), existing=True)
    run.check(("direction", "calibrate", "rollout"))
    r = run.rollout()
    click.echo(f"{r.n_rows} rollouts, {int(r.gen_len.sum())} tokens -> {out}")


@main.command("pmass")
@out_option
@pmass_options
@user_errors
def pmass_cmd(out, **kw) -> None:
    """Fork pmass along the saved rollouts."""
    run = open_run(out, given(**kw), existing=True)
    run.check(("direction", "calibrate", "rollout", "pmass"))
    pm = run.pmass()
    click.echo(f"{len(pm.frame)} forks evaluated -> {out}")
    _refresh_report(run)


@main.command("survival")
@out_option
@survival_options
@click.option("--threshold-sweep", is_flag=True,
              help="Also tabulate S(end) and the median death token per alpha under other death rules (absolute "
                   "thresholds 0.5-0.95, relative 0.25-0.75, death runs 1-3): threshold_sweep.csv/.md/.png.")
@user_errors
def survival_cmd(out, threshold_sweep, **kw) -> None:
    """Deaths and Kaplan-Meier survival from the saved pmass (never reruns rollouts)."""
    run = open_run(out, given(**kw), existing=True)
    run.check()
    click.echo(run.survival().to_markdown(), nl=False)
    _refresh_report(run)
    if threshold_sweep:
        from isokl_tl.survival import sweep_markdown
        click.echo("\nUnder other death rules: S(end) / median death token\n")
        click.echo(sweep_markdown(run.threshold_sweep()), nl=False)


def _refresh_report(run) -> None:
    """Redraw the figures and summary.md of a run whose survival changed, if it had them."""
    from isokl_tl.manifest import SUMMARY

    if (run.dir / SUMMARY).exists():
        run.plot()
        click.echo(f"figures and {SUMMARY} refreshed -> {run.dir}", err=True)


@main.command("plot")
@out_option
@user_errors
def plot_cmd(out) -> None:
    """(Re)draw every figure and the summary of a run directory."""
    run = open_run(out, {}, existing=True)
    run.check()
    run.plot(force=True)
    click.echo(f"figures and summary.md -> {out}")


@main.command("run")
@model_options
@hook_options
@direction_options
@calibration_options
@sweep_options
@pmass_options
@survival_options
@click.option("--config", type=click.Path(dir_okay=False, exists=True),
              help="TOML file of settings, keyed by RunConfig's fields: the long option names with _ for -, "
                   "except --direction (direction_file) and --target-kl (target) (docs/cell.toml); "
                   "options given win.")
@FORCE
@out_option
@user_errors
def run_cmd(out, config, force, **kw) -> None:
    """The whole cell: direction -> calibration -> sweep -> pmass -> survival -> figures -> summary."""
    run = open_run(out, given(**kw), config, force)
    run.run_all()
    click.echo((run.dir / "summary.md").read_text())


@main.command("layers")
@model_options
@click.option("--layers", "layer_spec", default=None,
              help="start:stop:step (stop exclusive) or a comma list [default: 6 layers evenly spread].")
@click.option("--method", default="mean_diff", show_default=True, type=click.Choice(
    ["mean_diff", "pca", "directional_ablation", "random"]), help="Direction method calibrated at each layer.")
@click.option("--pairs", default="pairs", show_default=True, help="Contrastive pairs: set name or JSONL file.")
@click.option("--calib-prompts", default="calibration", show_default=True, help="Calibration prompts.")
@click.option("--n-calib", default=8, show_default=True, help="Calibration prompts used.")
@click.option("--calib-window", default=32, show_default=True, help="Calibration window in tokens.")
@click.option("--target-kl", default=1.0, show_default=True, help="Target KL statistic, nats.")
@click.option("--heldout-prompts", default="eval", show_default=True,
              help="Held-out prompts for the ablation study's pmass.")
@click.option("--n-heldout", default=8, show_default=True,
              help="Held-out prompts used; 0 skips the ablation study.")
@out_option
@user_errors
def layers_cmd(model, device, dtype, out, **kw) -> None:
    """Per-layer diagnostics: c* (absolute and relative to the residual norm), KL curvature,
    direction quality, propagation of the perturbation through later layers, and directional
    ablation at the same KL budget with its held-out pmass. Writes layers.csv, layers.md,
    layers_propagation.csv and layers.png."""
    from isokl_tl.layers import study_layers

    study = study_layers(model, out, device=device or "cpu", dtype=dtype or "float32", **kw)
    click.echo(study.to_markdown(), nl=False)


main.add_command(grid_cmd)


def console() -> None:
    """The `isokl-tl` script: `main`, then `startup.leave` with its exit status (a traceback that
    escapes click leaves the usual way)."""
    try:
        main()
    except SystemExit as e:
        leave(e.code)


if __name__ == "__main__":
    console()
