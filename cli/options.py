"""Option sets shared by the commands (one decorator per stage's settings).

Nothing here imports the library, so `--help` stays fast; the defaults shown are
`RunConfig`'s, and a test checks that every `[default: X]` here says what `RunConfig()` holds.
Every option defaults to None, meaning "not given": the run's settings then come from the
`--config` file, the run directory's saved config, or `RunConfig`'s defaults, in that order.
"""

import click

EMBEDDED = "smollm2-135m-instruct"
METHODS = ("mean_diff", "pca", "directional_ablation", "random")
STATISTICS = ("quantile", "mean", "max", "prompt_quantile", "delta_ce")     # search.STATISTICS
SPLICES = ("interrupt", "inline")
DEATH_SIGNALS = ("pmass", "repetition", "compression", "surprisal", "flip", "any")   # coherence.DEATH_SIGNALS


def _alphas(ctx, param, value):
    """`--alphas "0 0.5 1"`, `--alphas 0,0.5,1` or `--alphas 0 --alphas 0.5 ...`."""
    if not value:
        return None
    try:
        return tuple(float(x) for v in value for x in v.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"{' '.join(value)!r}: give numbers separated by spaces or commas") from None


class RowsPerBatch(click.ParamType):
    """A positive number of rows, or `auto`."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r}: give a number of rows or auto", param, ctx)


rows_per_batch_option = click.option(
    "--rows-per-batch", type=RowsPerBatch(), default=None,
    help="Rollout rows per forward batch, or auto: at most 64 on the CPU, on a GPU as many as fit 30% of its "
         "memory beyond the weights, at most 512; spread evenly over the batches [default: auto].")


def _stack(f, options):
    for opt in reversed(options):
        f = opt(f)
    return f


def out_option(f):
    """`--out DIR` (alias `--run`): the run directory, the same name in every command (checked by
    the library, so that every problem with it is one line)."""
    return click.option("--out", "--run", "out", required=True, type=click.Path(), help="Run directory.")(f)


def model_options(f):
    return _stack(f, [
        click.option("--model", "model", default=None,
                     help=f"Model spec; `isokl-tl models` lists what is accepted [default: {EMBEDDED}]."),
        click.option("--device", default=None, help="Torch device, e.g. cpu or cuda [default: cpu]."),
        click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
                     help="Weight and activation dtype [default: float32]."),
    ])


def hook_options(f):
    return _stack(f, [
        click.option("--hook", default=None,
                     help="TransformerLens hook name [default: blocks.{int(0.6 * n_layers)}.hook_resid_post]."),
        click.option("--layer", type=int, default=None, help="Shorthand for --hook blocks.LAYER.hook_resid_post."),
    ])


def direction_options(f):
    return _stack(f, [
        click.option("--method", type=click.Choice(METHODS), default=None,
                     help="Direction method [default: mean_diff]."),
        click.option("--pairs", default=None, help="Contrastive pairs: shipped set name or JSONL file [default: pairs]."),
        click.option("--seed", type=int, default=None, help="Seed (random direction, sampling, bootstrap) [default: 0]."),
        click.option("--resample-pairs/--no-resample-pairs", default=None,
                     help="Build the direction from a bootstrap resample of the pairs drawn with --seed (a study's "
                          "seeds then give across-seed intervals) [default: no-resample-pairs]."),
        click.option("--gate/--no-gate", default=None,
                     help="Add the direction through a cosine gate, h + c max(cos(h, v), 0) v: only where the "
                          "residual already leans along v [default: no-gate]."),
        click.option("--direction", "direction_file", default=None, type=click.Path(),
                     help="Steer along a vector from a file instead: .safetensors, .pt, .npy, or a llama.cpp "
                          "control vector (.gguf, the hook's block); added, or projected out with "
                          "--method directional_ablation."),
        click.option("--direction-key", default=None, help="The tensor to read from a --direction file that holds several."),
        click.option("--sae", default=None, type=click.Path(),
                     help="Steer along a feature's decoder row of a SAELens-format SAE directory (with --feature); "
                          "the hook is the SAE's."),
        click.option("--feature", type=int, default=None, help="The SAE feature (row of W_dec) for --sae."),
    ])


def calibration_options(f):
    return _stack(f, [
        click.option("--calib-window", type=int, default=None,
                     help="Calibration rollout window in tokens [default: 32]."),
        click.option("--target-kl", "target", type=float, default=None,
                     help="Target value of the KL statistic, nats [default: 1.0]."),
        click.option("--quantile", type=float, default=None, help="Quantile q of the statistic [default: 0.95]."),
        click.option("--statistic", type=click.Choice(STATISTICS), default=None,
                     help="Calibration statistic: a quantile, the mean or the max of per-token KL over the "
                          "calibration rollouts, the mean of per-prompt quantiles, or delta_ce, the mean rise in "
                          "cross-entropy on a text corpus, teacher-forced [default: quantile]."),
        click.option("--sign", type=click.Choice(("positive", "negative", "both")), default=None,
                     help="Steer along +v, along -v, or both, each sign with its own c*; negative alphas in "
                          "the results are -v's [default: positive]."),
        click.option("--corpus", default=None,
                     help="delta_ce: the text corpus, shipped set name or JSONL file of {\"text\": ...} rows; "
                          "--n-calib passages are scored [default: corpus]."),
        click.option("--tol", type=float, default=None, help="Relative tolerance of the search [default: 0.02]."),
        click.option("--bootstrap", type=int, default=None,
                     help="Bootstrap resamples for the c* interval; 0 turns it off [default: 200]."),
        click.option("--calib-prompts", default=None,
                     help="Calibration prompts: shipped set name or JSONL file [default: calibration]."),
        click.option("--n-calib", type=int, default=None, help="Calibration prompts used [default: 8]."),
        click.option("--generated-only/--all-positions", "generated_only", default=None,
                     help="Steer generated tokens only, or every position, prompt included [default: all-positions]."),
    ])


def sweep_options(f):
    return _stack(f, [
        click.option("--alphas", callback=_alphas, multiple=True,
                     help='Dose multiples of c*: "0 0.5 1", 0,0.5,1 or repeated; 0 is always added '
                          "[default: 0 0.25 0.5 0.75 1 1.5 2 4]."),
        click.option("--prompts", default=None, help="Held-out prompts: shipped set name (longform, eval) or JSONL file [default: longform]."),
        click.option("--n-prompts", type=int, default=None, help="Held-out prompts used [default: 12]."),
        click.option("--window", type=int, default=None, help="Tokens per held-out rollout [default: 96]."),
        click.option("--temperature", type=float, default=None, help="Sampling temperature; 0 is greedy [default: 0.0]."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass [default: 1.0]."),
        click.option("--record-acts/--no-record-acts", default=None,
                     help="Also record, per generated token, every layer's residual projected on the "
                          "direction, its norm and ||steered - base||, and the steered hook's residual "
                          "(float16) -> activations.safetensors [default: no-record-acts]."),
        rows_per_batch_option,
        click.option("--inline-forks/--forks-after-sweep", "inline_forks", default=None,
                     help="Read fork pmass off each rollout's own cache while the sweep decodes, or afterwards "
                          "from the saved rollouts (the reference path; same numbers within 1e-5) "
                          "[default: inline-forks]."),
    ])


def pmass_options(f):
    return _stack(f, [
        click.option("--fork-every", type=int, default=None, help="Fork every k tokens [default: 16]."),
        click.option("--fork-log", type=int, default=None, help="Instead: this many log-spaced forks."),
        click.option("--splice", type=click.Choice(SPLICES), default=None, help="Splice mode [default: interrupt]."),
        click.option("--splice-close", default=None, help="Inline mode: text that closes a thinking block; on a model with <think>/</think> tokens "
                          "it goes only to forks inside an open block [default there: '</think>\\n'; '' for none]."),
        click.option("--splice-prefill", default=None, help='Answer prefill [default: {"choice": ].'),
    ])


def survival_options(f):
    return _stack(f, [
        click.option("--threshold", type=float, default=None, help="Absolute pmass death threshold, in (0, 1)."),
        click.option("--relative-threshold", type=float, default=None,
                     help="Death below this fraction of the prompt's unsteered pmass at fork 0 [default: 0.5]."),
        click.option("--death-run", type=int, default=None,
                     help="Consecutive forks below the threshold for a death [default: 1]."),
        click.option("--min-base-pmass", type=float, default=None,
                     help="Relative mode: prompts with a lower unsteered pmass at fork 0 are weak, as are prompts "
                          "whose unsteered rollout dies by the rule itself [default: 0.3]."),
        click.option("--keep-weak/--drop-weak", default=None,
                     help="Keep weak prompts in survival [default: drop-weak]."),
        click.option("--death-signal", type=click.Choice(DEATH_SIGNALS), default=None,
                     help="What kills a rollout in the survival table: pmass below the threshold; repetition, "
                          "compression or base surprisal of the text at or above theirs; the answer flipping "
                          "(rollouts whose question the unsteered model answers right); or any of them "
                          "[default: pmass]."),
        click.option("--repetition-threshold", type=float, default=None,
                     help="Death when this share of the last 32 tokens lies inside 8-grams seen before in the rollout "
                          "(1: all of them, a loop) [default: 1.0]."),
        click.option("--compression-threshold", type=float, default=None,
                     help="Death when DEFLATE compresses the last 32 tokens' text, decoded together, this many times "
                          "[default: 3.0]."),
        click.option("--surprisal-threshold", type=float, default=None,
                     help="Death when the base model's mean surprisal (-log p) of the last 16 steered tokens "
                          "reaches this many nats [default: 2.0]."),
    ])


def given(**kw) -> dict:
    """The options the user actually gave (None: not given), as settings: the partner of an
    exclusive option given is turned off (`--threshold` turns `--relative-threshold` off, and so
    on), and giving both of a pair is one line of error (`isokl_tl.config.settle`)."""
    from isokl_tl.config import settle

    return settle({k: v for k, v in kw.items() if v is not None})
