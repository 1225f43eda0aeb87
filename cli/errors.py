"""How the CLI fails: one line per user error (the traceback with --debug), and the --force option
that overrides a refused run directory."""

import errno
import functools

import click


def user_errors(f):
    """Bad input and file-system errors become one line on stderr and exit code 1 (the traceback
    with --debug)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except (ValueError, OSError) as e:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            if isinstance(e, OSError) and e.filename is not None:
                verb = "write to" if e.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EPERM) else "use"
                raise click.ClickException(f"cannot {verb} {str(e.filename)!r}: "
                                           f"{(e.strerror or str(e)).lower()}") from None
            raise click.ClickException(str(e).splitlines()[0] if str(e) else repr(e)) from None

    return wrapper


FORCE = click.option("--force", is_flag=True,
                     help="Overwrite a run directory that was made with a different config.")
