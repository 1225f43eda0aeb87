"""Option sets shared by several commands, and the error boundary of the CLI."""

import functools

import click

from isokl_tl.models import EMBEDDED


def model_options(f):
    """--model/--device/--dtype."""
    f = click.option("--dtype", default="float32", show_default=True,
                     type=click.Choice(["float32", "float16", "bfloat16"]),
                     help="Weight and activation dtype.")(f)
    f = click.option("--device", default="cpu", show_default=True,
                     help="Torch device, e.g. cpu or cuda.")(f)
    f = click.option("--model", "model_spec", default=EMBEDDED, show_default=True,
                     help="Model spec; `isokl-tl models` lists what is accepted.")(f)
    return f


def hook_options(f):
    """--hook/--layer."""
    f = click.option("--layer", type=int, default=None,
                     help="Shorthand for --hook blocks.LAYER.hook_resid_post.")(f)
    f = click.option("--hook", default=None,
                     help="TransformerLens hook name (default: blocks.{int(0.6*n_layers)}.hook_resid_post).")(f)
    return f


def user_errors(f):
    """Turn a library ValueError into one line on stderr and exit code 1 (traceback with --debug)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            raise click.ClickException(str(e).splitlines()[0] if str(e) else repr(e)) from None

    return wrapper

