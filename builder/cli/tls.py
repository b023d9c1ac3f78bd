"""`serverless-triton tls show|reload`: the certificate a running serve presents, and swapping it live.

Renew a certificate by replacing the files serve was started with (same paths), then `tls reload`:
the pair is checked first (a bad one changes nothing), then nginx reloads gracefully, so new
connections get the new certificate and in-flight requests finish on the old one.
"""

from __future__ import annotations

from pathlib import Path

import click

from backends.errors import ProxyError
from builder.cli.base import state_dir_options, state_dir_path
from builder.serve.proxy import StateDir, reload_certificates
from builder.serve.tls import check_pair


@click.group()
def tls() -> None:
    """Show or reload the TLS certificate of a running serve.

    \b
    serverless-triton tls show                   # of the serve on --http-port 8000
    serverless-triton tls reload --state-dir DIR # after replacing the certificate and key files
    """


def _pair(state: StateDir):
    layout = state.read_layout()
    if not layout.tls_cert:
        raise ProxyError(f"the serve of {state.path} has no TLS: start it with --tls-cert/--tls-key or --tls self-signed")
    return check_pair(Path(layout.tls_cert), Path(layout.tls_key))


@tls.command()
@state_dir_options
def show(state_dir, http_port):
    """Print the certificate file, its expiry and SHA-256 fingerprint."""
    pair = _pair(StateDir(state_dir_path(state_dir, http_port)))
    click.echo(f"certificate {pair.cert}")
    click.echo(f"key         {pair.key}")
    click.echo(f"expires     {pair.not_after:%Y-%m-%d %H:%M} UTC")
    click.echo(f"SHA-256     {pair.fingerprint}")


@tls.command()
@state_dir_options
def reload(state_dir, http_port):
    """Check the (replaced) certificate and key, then reload nginx gracefully."""
    state = StateDir(state_dir_path(state_dir, http_port))
    reloaded = reload_certificates(state)
    pair = _pair(state)
    if reloaded:
        click.echo(f"nginx reloaded: new connections get {pair.cert} (SHA-256 {pair.fingerprint})")
    else:
        click.echo(f"no proxy is running from {state.path}: the next serve there uses {pair.cert}")
