"""Command-line edges: `build-engines` and `serverless-triton`.

Commands stay thin: they parse options, call the package, and turn a UserError into one line on
stderr and exit code 1. Each command group lives in its own module and is registered here.
"""

from __future__ import annotations

import click

from builder.allowed_ips_cli import allowed_ips
from builder.build_cli import build_engines
from builder.cli_base import Command, Group
from builder.repo_cli import repo
from builder.serve_cli import serve


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="serverless-triton")
def main() -> None:
    """Serve per-precision engines from a Triton model repository, the way a managed service does."""


main.add_command(build_engines, name="build")
main.add_command(serve)
main.add_command(repo)
main.add_command(allowed_ips)

__all__ = ["main", "build_engines", "Command", "Group"]


if __name__ == "__main__":
    main()
