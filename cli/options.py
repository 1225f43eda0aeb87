"""Option sets shared by the stage commands (one decorator per stage's settings)."""

import click

from isokl_tl.config import RunConfig

D = RunConfig()


def _alphas(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(x) for x in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give numbers separated by spaces or commas") from None


def direction_options(f):
    for opt in reversed([
        click.option("--method", type=click.Choice(["mean_diff", "pca", "directional_ablation", "random"]),
                     default=None, help=f"Direction method [default: {D.method}]."),
        click.option("--pairs", default=None, help="Contrastive pairs: shipped set name or JSONL file."),
        click.option("--seed", type=int, default=None, help="Seed (random direction, sampling, bootstrap)."),
    ]):
        f = opt(f)
    return f


def calibration_options(f):
    for opt in reversed([
        click.option("--calib-window", type=int, default=None,
                     help=f"Calibration rollout window in tokens [default: {D.calib_window}]."),
        click.option("--target-kl", "target", type=float, default=None,
                     help=f"Target value of the KL statistic, nats [default: {D.target}]."),
        click.option("--quantile", type=float, default=None, help=f"Quantile q [default: {D.quantile}]."),
        click.option("--statistic", type=click.Choice(["quantile", "mean", "max", "prompt_quantile"]),
                     default=None, help="Calibration statistic [default: quantile]."),
        click.option("--tol", type=float, default=None, help=f"Relative tolerance [default: {D.tol}]."),
        click.option("--bootstrap", type=int, default=None,
                     help=f"Bootstrap resamples for the c* interval; 0 turns it off [default: {D.bootstrap}]."),
        click.option("--calib-prompts", default=None, help="Calibration prompts: set name or JSONL file."),
        click.option("--n-calib", type=int, default=None, help=f"Calibration prompts used [default: {D.n_calib}]."),
        click.option("--generated-only", is_flag=True, default=None,
                     help="Steer generated tokens only (default: every position, prompt included)."),
    ]):
        f = opt(f)
    return f


def sweep_options(f):
    for opt in reversed([
        click.option("--alphas", callback=_alphas, default=None,
                     help='Dose multiples of c*, e.g. "0 0.5 1 2 4" [default: 0 0.5 1 2 4]; 0 is always added.'),
        click.option("--prompts", default=None, help="Held-out prompts: set name or JSONL file [default: eval]."),
        click.option("--n-prompts", type=int, default=None, help=f"Held-out prompts used [default: {D.n_prompts}]."),
        click.option("--window", type=int, default=None, help=f"Tokens per rollout [default: {D.window}]."),
        click.option("--temperature", type=float, default=None, help="Sampling temperature (0: greedy)."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass."),
        click.option("--record-acts/--no-record-acts", default=None,
                     help="Also record, per generated token, every layer's residual projected on the "
                          "direction, its norm and ||steered - base||, and the steered hook's residual "
                          "(float16) -> activations.safetensors."),
    ]):
        f = opt(f)
    return f


def pmass_options(f):
    for opt in reversed([
        click.option("--fork-every", type=int, default=None, help=f"Fork every k tokens [default: {D.fork_every}]."),
        click.option("--fork-log", type=int, default=None, help="Instead: this many log-spaced forks."),
        click.option("--splice", type=click.Choice(["interrupt", "inline"]), default=None,
                     help="Splice mode [default: interrupt]."),
        click.option("--splice-close", default=None, help="Inline mode: text that closes a thinking block."),
        click.option("--splice-prefill", default=None, help='Answer prefill [default: {"choice": ].'),
    ]):
        f = opt(f)
    return f


def survival_options(f):
    for opt in reversed([
        click.option("--threshold", type=float, default=None, help="Absolute pmass death threshold."),
        click.option("--relative-threshold", type=float, default=None,
                     help=f"Death below this fraction of the prompt's unsteered pmass [default: {D.relative_threshold}]."),
        click.option("--death-run", type=int, default=None, help="Consecutive forks below threshold for death."),
        click.option("--min-base-pmass", type=float, default=None,
                     help=f"Relative mode: prompts with lower unsteered pmass are weak [default: {D.min_base_pmass}]."),
        click.option("--keep-weak/--drop-weak", default=None, help="Keep weak prompts in survival."),
    ]):
        f = opt(f)
    return f


def overrides(**kw) -> dict:
    """Options the user actually gave (None means: keep the config's value)."""
    out = {k: v for k, v in kw.items() if v is not None}
    if out.get("threshold") is not None:
        out["relative_threshold"] = None
    if out.get("relative_threshold") is not None and "threshold" not in out:
        out["threshold"] = None
    if out.get("fork_log") is not None:
        out["fork_every"] = None
    if out.get("fork_every") is not None:
        out["fork_log"] = None
    return out
