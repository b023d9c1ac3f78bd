"""What every command uses: click classes that turn a UserError below into `Error: <message>` and
exit 1, and the options that address a running serve by its state directory."""

from __future__ import annotations

from pathlib import Path

import click

from backends.errors import UserError
from builder.serve.proxy import default_state_dir


class _UserErrorsAsLines:
    """Mixin: a UserError anywhere below becomes one line on stderr and exit 1, no traceback."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except UserError as e:
            raise click.ClickException(str(e)) from None


class Group(_UserErrorsAsLines, click.Group):
    pass


class Command(_UserErrorsAsLines, click.Command):
    pass


def state_dir_options(f):
    """--state-dir / --http-port: which serve a command talks to (the same addressing everywhere)."""
    f = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="State directory of the serve [default: $XDG_CACHE_HOME/serverless-triton/serve-HTTP_PORT]")(f)
    f = click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535),
                     help="Public HTTP port of the serve (picks the default state directory).")(f)
    return f


def state_dir_path(state_dir: Path | None, http_port: int) -> Path:
    return Path(state_dir) if state_dir else default_state_dir(http_port)
