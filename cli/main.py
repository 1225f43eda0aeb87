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


@main.command()
@model_options
@hook_options
@click.option("--method", default="mean_diff", show_default=True,
              type=click.Choice(["mean_diff", "pca", "directional_ablation", "random"]),
              help="How the direction is built from the contrastive pairs.")
@click.option("--pairs", default="pairs", show_default=True,
              help="Contrastive pairs: a shipped set name or a JSONL file.")
@click.option("--seed", default=0, show_default=True, help="Seed (used by --method random).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Run directory to write the direction into.")
@user_errors
def direction(model_spec, device, dtype, hook, layer, method, pairs, seed, out) -> None:
    """Build a steering direction and save it into a run directory."""
    from isokl_tl.directions import compute_direction
    from isokl_tl.hooks import resolve_hook
    from isokl_tl.models import load_model
    from isokl_tl.prompts import load_pairs

    model = load_model(model_spec, device=device, dtype=dtype)
    d = compute_direction(model, load_pairs(pairs), resolve_hook(model, hook, layer), method, seed=seed)
    d.save(out)
    click.echo(f"{d.method} direction at {d.hook}: raw norm {d.raw_norm:.3g}, projection gap "
               f"{d.projection_gap:.3g}, median residual norm {d.resid_norm:.3g} -> {out}")


if __name__ == "__main__":
    main()
