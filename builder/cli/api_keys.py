"""`serverless-triton api-keys create|list|revoke|limit`: the keys callers present as
`Authorization: Bearer KEY` (HTTP) or `authorization` metadata (gRPC).

Keys live hashed (sha256) in the serve's state directory (api-keys.json, mode 0600); the plaintext is
printed once, at creation, as the last line of stdout. A running deployment applies a new key, a
revocation or a rate limit within a second, without a restart.
"""

from __future__ import annotations

import re
import time

import click

from backends.errors import InvalidArgumentError
from builder.cli.base import state_dir_options, state_dir_path
from builder.serve.gateway.keys import KeyStore

_LIMIT = re.compile(r"^\s*(\d+)\s*(/\s*min)?\s*$")


def parse_rate_limit(value: str | None) -> int | None:
    """`60/min` or `60` requests a minute; `none` (or nothing) for no limit."""
    if value is None or value.strip().lower() == "none":
        return None
    m = _LIMIT.match(value)
    if not m or int(m[1]) < 1:
        raise InvalidArgumentError(f"rate limit {value!r} is not N/min with N >= 1: write e.g. --rate-limit 60/min")
    return int(m[1])


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "never"


@click.group("api-keys")
def api_keys() -> None:
    """Create, list and revoke the API keys of a deployment.

    \b
    serverless-triton api-keys create my-app --rate-limit 600/min   # prints the key once
    serverless-triton api-keys list
    serverless-triton api-keys revoke my-app
    """


@api_keys.command()
@click.argument("name")
@click.option("--rate-limit", metavar="N/min", help="Requests a minute this key may make (default: no limit).")
@state_dir_options
def create(name, rate_limit, state_dir, http_port):
    """Create a key named NAME; its value is printed once, as the last line."""
    store = KeyStore(state_dir_path(state_dir, http_port))
    key = store.create(name, parse_rate_limit(rate_limit))
    limit = parse_rate_limit(rate_limit)
    click.echo(f"created API key {name!r}" + (f" ({limit} requests/min)" if limit else "") +
               f" in {store.path}; it is shown only now:", err=True)
    click.echo(key)


@api_keys.command("list")
@state_dir_options
def list_(state_dir, http_port):
    """Name, creation and last use of every key (never the key itself)."""
    keys = KeyStore(state_dir_path(state_dir, http_port)).list()
    if not keys:
        click.echo("no API keys: create one with `serverless-triton api-keys create NAME`")
    for k in keys:
        limit = f"{k.rate_limit_per_min}/min" if k.rate_limit_per_min else "no limit"
        click.echo(f"{k.name}\t{k.prefix}...\tcreated {_when(k.created)}\tlast used {_when(k.last_used)}\t{limit}")


@api_keys.command()
@click.argument("name")
@state_dir_options
def revoke(name, state_dir, http_port):
    """Revoke the key named NAME (refused within a second by a running deployment)."""
    KeyStore(state_dir_path(state_dir, http_port)).revoke(name)
    click.echo(f"revoked API key {name!r}")


@api_keys.command()
@click.argument("name")
@click.argument("rate_limit", metavar="N/min|none")
@state_dir_options
def limit(name, rate_limit, state_dir, http_port):
    """Set (or with `none` remove) the rate limit of the key named NAME."""
    value = parse_rate_limit(rate_limit)
    KeyStore(state_dir_path(state_dir, http_port)).set_rate_limit(name, value)
    click.echo(f"API key {name!r}: " + (f"{value} requests/min" if value else "no rate limit"))
