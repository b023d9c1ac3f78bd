"""Click classes every command uses: a UserError below becomes `Error: <message>` and exit 1."""

from __future__ import annotations

import click

from backends.errors import UserError


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
