"""Command-line edges: `build-engines` and `serverless-triton` (also `python -m builder`).

Commands stay thin: they parse options, call the package, and turn a UserError into one line on
stderr and exit code 1. Each command group lives in its own module and is registered here.
"""

from __future__ import annotations

import click

from builder.cli.allowed_ips import allowed_ips
from builder.cli.api_keys import api_keys
from builder.cli.base import Group
from builder.cli.build import build_engines
from builder.cli.deployments import status, unload, wake
from builder.cli.export import export
from builder.cli.repo import repo
from builder.cli.serve import serve
from builder.cli.top import top
from builder.cli.tls import tls


# auto_envvar_prefix: every option can also come from SERVERLESS_TRITON_<COMMAND>_<OPTION> (e.g.
# SERVERLESS_TRITON_SERVE_REPOSITORY): the container images configure `serve` that way.
@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                         "auto_envvar_prefix": "SERVERLESS_TRITON"})
@click.version_option(package_name="serverless-triton")
def main() -> None:
    """Serve per-precision engines from a Triton model repository, the way a managed service does."""


main.add_command(build_engines, name="build")
main.add_command(serve)
main.add_command(repo)
main.add_command(allowed_ips)
main.add_command(api_keys)
main.add_command(tls)
main.add_command(export)
main.add_command(status)
main.add_command(wake)
main.add_command(unload)
main.add_command(top)

__all__ = ["main", "build_engines"]
