"""`serverless-triton allowed-ips list|add|remove|set`: change who may reach a running deployment.

The commands find the deployment through its state directory (the one `serve` printed; by default
$XDG_CACHE_HOME/serverless-triton/serve-<http port>/). Every entry is validated before anything changes;
a running nginx is reloaded gracefully (in-flight requests finish) after `nginx -t` passes.
"""

from __future__ import annotations

from pathlib import Path

import click

from backends.errors import InvalidArgumentError
from builder.cli.base import state_dir_options, state_dir_path
from builder.serve.proxy import AccessRules, StateDir, apply_rules


def _state(state_dir: Path | None, http_port: int) -> StateDir:
    state = StateDir(state_dir_path(state_dir, http_port))
    state.read_layout()  # raises with the fix when no serve ever used this directory
    return state


def _current(state: StateDir) -> AccessRules:
    return state.read_rules() or AccessRules()


def _describe(rules: AccessRules) -> str:
    return ", ".join(rules.allowed_ips) if rules.allowed_ips else "everyone (empty list)"


def _apply(state: StateDir, rules: AccessRules) -> None:
    reloaded = apply_rules(state, rules)
    click.echo(f"allowed IPs: {_describe(rules)}")
    if reloaded:
        click.echo("nginx reloaded (in-flight requests finish on the old rules)")
    else:
        click.echo(f"no proxy is running from {state.path}: saved; applies at the next serve there")


@click.group("allowed-ips")
def allowed_ips() -> None:
    """Show or change the client addresses allowed to reach a deployment.

    Entries are IPv4/IPv6 addresses or CIDR blocks (203.0.113.7, 203.0.113.0/24, 2001:db8::/32).
    An empty list lets everyone in.
    """


@allowed_ips.command("list")
@state_dir_options
def list_(state_dir, http_port):
    """Print the allowed IPs (one per line) and the trusted proxies."""
    rules = _current(_state(state_dir, http_port))
    if not rules.allowed_ips:
        click.echo("everyone (empty list)")
    for entry in rules.allowed_ips:
        click.echo(entry)
    for entry in rules.trusted_proxies:
        click.echo(f"{entry} (trusted proxy: X-Forwarded-For honoured)")


@allowed_ips.command()
@click.argument("entries", nargs=-1, required=True)
@state_dir_options
def add(entries, state_dir, http_port):
    """Allow ENTRIES in addition to the current list."""
    state = _state(state_dir, http_port)
    _apply(state, _current(state).adding(entries))


@allowed_ips.command()
@click.argument("entries", nargs=-1, required=True)
@state_dir_options
def remove(entries, state_dir, http_port):
    """Stop allowing ENTRIES (never empties the list: that is `set --everyone`)."""
    state = _state(state_dir, http_port)
    current = _current(state)
    rules = current.removing(entries)
    if current.allowed_ips and not rules.allowed_ips:
        raise InvalidArgumentError("removing every entry would let everyone in: run `allowed-ips set --everyone` "
                                   "if that is what you want, or `set` the new list")
    _apply(state, rules)


@allowed_ips.command("set")
@click.argument("entries", nargs=-1)
@click.option("--everyone", is_flag=True, help="Empty the list: every address is allowed.")
@state_dir_options
def set_(entries, everyone, state_dir, http_port):
    """Replace the list with ENTRIES (or empty it with --everyone)."""
    if bool(entries) == everyone:
        raise InvalidArgumentError("give the new entries, or --everyone (and no entries) to allow every address")
    state = _state(state_dir, http_port)
    _apply(state, _current(state).setting(entries))
