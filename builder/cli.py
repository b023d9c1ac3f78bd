"""Command-line edges: `build-engines` and `serverless-triton`.

Commands stay thin: they parse options, call the package, and turn a UserError into one line on
stderr and exit code 1. Each command group lives in its own module and is registered here.
"""

from __future__ import annotations

import click

from builder.errors import UserError


class _UserErrorsAsLines:
    """Mixin: a UserError anywhere below becomes `Error: <message>` and exit 1, no traceback."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except UserError as e:
            raise click.ClickException(str(e)) from None


class Group(_UserErrorsAsLines, click.Group):
    pass


class Command(_UserErrorsAsLines, click.Command):
    pass


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="serverless-triton")
def main() -> None:
    """Serve per-precision engines from a Triton model repository, the way a managed service does."""


from builder.build_cli import build_engines  # noqa: E402  (the console script `build-engines`)
from builder.serve_cli import serve  # noqa: E402

main.add_command(serve)
from builder.repo_cli import repo; main.add_command(repo)  # noqa: E402,E702
from builder.allowed_ips_cli import allowed_ips; main.add_command(allowed_ips)  # noqa: E402,E702
main.add_command(build_engines, name="build")

__all__ = ["main", "build_engines", "Command", "Group"]
