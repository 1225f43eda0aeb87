"""`isokl-tl`: a thin click shell over the isokl_tl library."""

import click

from isokl_tl.cli.common import hook_options, model_options, user_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Iso-KL calibrated steering on TransformerLens models: directions, calibration, long
    rollouts with per-token KL, fork pmass and Kaplan-Meier survival."""


@main.command()
def models() -> None:
    """List the model specs that --model accepts."""
    from isokl_tl.models import MODEL_SPECS

    for spec, what in MODEL_SPECS.items():
        click.echo(f"{spec:24s} {what}")


# --- stage commands over a run directory ---------------------------------------------------------
from isokl_tl.cli.options import (calibration_options, direction_options, overrides,  # noqa: E402
                                  pmass_options, survival_options, sweep_options)


def _fresh_or_existing(out: str, given: dict, config: str | None = None, force: bool = False):
    """A Run at `out`: its saved config (if any), then --config, then the options given."""
    from isokl_tl.config import RunConfig
    from isokl_tl.pipeline import Run
    from isokl_tl.runs import Manifest

    saved = Manifest(out).data.get("config", {})
    base = RunConfig.from_toml(config).to_dict() if config else {}
    cfg = RunConfig.from_dict({**saved, **base, **given})
    return Run(out, cfg, log=lambda m: click.echo(m, err=True), force=force)


FORCE = click.option("--force", is_flag=True,
                     help="Overwrite a run directory that was made with a different config.")


@main.command()
@model_options
@hook_options
@direction_options
@FORCE
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@user_errors
def direction(out, force, **kw) -> None:
    """Build a steering direction and save it into a run directory."""
    run = _fresh_or_existing(out, _given(**kw), force=force)
    run.begin()
    d = run.direction()
    click.echo(f"{d.method} direction at {d.hook}: raw norm {d.raw_norm:.3g}, projection gap "
               f"{d.projection_gap:.3g}, median residual norm {d.resid_norm:.3g} -> {out}")


def _run_options(f):
    for opt in reversed([model_options, hook_options, direction_options, calibration_options]):
        f = opt(f)
    return f


def _given(model_spec=None, **kw) -> dict:
    return overrides(model=model_spec, **kw)


@main.command("calibrate")
@_run_options
@click.option("--window", "window_alias", type=int, default=None, help="Same as --calib-window.")
@FORCE
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@user_errors
def calibrate_cmd(out, window_alias, force, **kw) -> None:
    """Find the iso-KL coefficient c* (builds or reuses the run's direction)."""
    if window_alias is not None:
        kw["calib_window"] = window_alias
    run = _fresh_or_existing(out, _given(**kw), force=force)
    run.begin()
    cal = run.calibrate()
    ci = f"  90% interval [{cal.interval[0]:.4g}, {cal.interval[1]:.4g}]" if cal.interval else ""
    click.echo(f"c* = {cal.c_star:.4g}{ci}  ({cal.statistic} {cal.quantile:g} of KL = {cal.value:.4g}, "
               f"target {cal.target:g}, window {cal.window}, {cal.rounds} rounds, converged {cal.converged})")


@main.command("rollout")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Run directory (with a calibration).")
@sweep_options
@user_errors
def rollout_cmd(run_dir, **kw) -> None:
    """Roll out the held-out sweep (coefficient = alpha x c*) and save tokens, per-token KL, texts."""
    run = _fresh_or_existing(run_dir, overrides(**kw))
    r = run.rollout()
    click.echo(f"{r.n_rows} rollouts, {int(r.gen_len.sum())} tokens -> {run_dir}")


@main.command("pmass")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Run directory (with rollouts).")
@pmass_options
@user_errors
def pmass_cmd(run_dir, **kw) -> None:
    """Fork pmass along the saved rollouts."""
    run = _fresh_or_existing(run_dir, overrides(**kw))
    pm = run.pmass()
    click.echo(f"{len(pm)} forks evaluated -> {run_dir}")


@main.command("survival")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Run directory (with pmass).")
@survival_options
@user_errors
def survival_cmd(run_dir, **kw) -> None:
    """Deaths and Kaplan-Meier survival from the saved pmass (never reruns rollouts)."""
    run = _fresh_or_existing(run_dir, overrides(**kw))
    click.echo(run.survival().to_string(index=False))


@main.command("plot")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="Run directory (with survival).")
@user_errors
def plot_cmd(run_dir) -> None:
    """(Re)draw every figure and the summary of a run directory."""
    run = _fresh_or_existing(run_dir, {})
    run.plot(force=True)
    click.echo(f"figures and summary.md -> {run_dir}")


@main.command("run")
@_run_options
@sweep_options
@pmass_options
@survival_options
@click.option("--config", type=click.Path(dir_okay=False, exists=True),
              help="TOML file with the same keys as the options (options given win).")
@click.option("--rows-per-batch", type=int, default=None, help="Rollout rows per forward batch.")
@FORCE
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@user_errors
def run_cmd(out, config, force, **kw) -> None:
    """The whole cell: direction -> calibration -> sweep -> pmass -> survival -> figures -> summary."""
    run = _fresh_or_existing(out, _given(**kw), config, force)
    run.run_all()
    click.echo((run.dir / "summary.md").read_text())


@main.command("layers")
@model_options
@click.option("--layers", "layer_spec", default=None,
              help="start:stop:step (stop exclusive) or a comma list [default: 6 layers evenly spread].")
@click.option("--method", default="mean_diff", show_default=True,
              type=click.Choice(["mean_diff", "pca", "directional_ablation", "random"]),
              help="Direction method calibrated at each layer.")
@click.option("--pairs", default="pairs", show_default=True, help="Contrastive pairs: set name or JSONL file.")
@click.option("--calib-prompts", default="calibration", show_default=True, help="Calibration prompts.")
@click.option("--n-calib", default=8, show_default=True, help="Calibration prompts used.")
@click.option("--calib-window", default=32, show_default=True, help="Calibration window in tokens.")
@click.option("--target-kl", default=1.0, show_default=True, help="Target KL statistic, nats.")
@click.option("--heldout-prompts", default="eval", show_default=True,
              help="Held-out prompts for the ablation study's pmass.")
@click.option("--n-heldout", default=8, show_default=True,
              help="Held-out prompts used; 0 skips the ablation study.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the table and figure.")
@user_errors
def layers_cmd(model_spec, device, dtype, layer_spec, method, pairs, calib_prompts, n_calib,
               calib_window, target_kl, heldout_prompts, n_heldout, out) -> None:
    """Per-layer diagnostics: c* (absolute and relative to the residual norm), KL curvature,
    direction quality, propagation of the perturbation through later layers, and directional
    ablation at the same KL budget with its held-out pmass. Writes layers.csv, layers.md,
    layers_propagation.csv and layers.png."""
    from pathlib import Path

    from isokl_tl.calibrate import CalibrationSettings
    from isokl_tl.chat import prompt_ids
    from isokl_tl.diagnostics import layer_study, parse_layers, table_markdown
    from isokl_tl.models import load_model
    from isokl_tl.plots import plot_layers, save_figure
    from isokl_tl.prompts import load_pairs, load_prompts
    from isokl_tl.runs import write_atomic, write_csv

    model = load_model(model_spec, device=device, dtype=dtype)
    n = model.cfg.n_layers
    chosen = parse_layers(layer_spec, n) if layer_spec else sorted({round(i * (n - 1) / 5) for i in range(6)})
    settings = CalibrationSettings(window=calib_window, target=target_kl, bootstrap=0)
    ids = lambda name, k: [prompt_ids(model.tokenizer, p) for p in load_prompts(name)[:k]]  # noqa: E731
    study = layer_study(model, load_pairs(pairs), ids(calib_prompts, n_calib), chosen, method=method,
                        settings=settings, heldout=ids(heldout_prompts, n_heldout) if n_heldout else None,
                        progress=True)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "layers.csv", study.table)
    write_csv(out_dir / "layers_propagation.csv", study.propagation)
    write_atomic(out_dir / "layers.md", lambda p: p.write_text(table_markdown(study.table)))
    save_figure(plot_layers(study.table, study.propagation), out_dir / "layers.png")
    click.echo(table_markdown(study.table))


if __name__ == "__main__":
    main()
