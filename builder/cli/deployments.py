"""`serverless-triton status | wake | unload`: the deployments of a running serve (scale to zero)."""

from __future__ import annotations

import json
import time

import click

from builder.cli.base import Command, state_dir_options, state_dir_path
from builder.serve.control import act, deployment_states


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    seconds = max(0, time.time() - ts)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _row(d: dict) -> str:
    idle = f"{d['idle_timeout']:.0f} s" if d["idle_timeout"] else "never"
    cold = f"{d['cold_starts']}" + (f" (last {d['last_cold_start_s']:.2f} s)" if d["last_cold_start_s"] else "")
    memory = f"{d['memory_bytes'] / 2**20:.0f} MiB" if d.get("memory_bytes") else "-"
    line = (f"{d['model']:<34} {d['state']:<9} {_ago(d['last_request']):<13} {d['in_flight']:>9} "
            f"{idle:>10} {memory:>8}  {cold}")
    return line + (f"\n    failed: {d['failure']}" if d.get("failure") else "")


@click.command(cls=Command)
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
@state_dir_options
def status(as_json, state_dir, http_port):
    """Every deployment of a running serve: loaded, unloaded, loading or failed, its last request,
    requests in flight, idle timeout, memory and cold starts."""
    states = deployment_states(state_dir_path(state_dir, http_port))
    if as_json:
        click.echo(json.dumps({"deployments": states}, indent=2))
        return
    click.echo(f"{'model':<34} {'state':<9} {'last request':<13} {'in flight':>9} {'idle after':>10} "
               f"{'memory':>8}  cold starts")
    for d in states:
        click.echo(_row(d))


@click.command(cls=Command)
@click.argument("model", metavar="NAME:PRECISION")
@state_dir_options
def wake(model, state_dir, http_port):
    """Load a deployment now (returns once it answers)."""
    t0 = time.monotonic()
    d = act(state_dir_path(state_dir, http_port), model, "wake")
    click.echo(f"{d['model']}: {d['state']} ({time.monotonic() - t0:.2f} s)")


@click.command(cls=Command)
@click.argument("model", metavar="NAME:PRECISION")
@state_dir_options
def unload(model, state_dir, http_port):
    """Unload a deployment now (refused while requests are in flight); the next request wakes it."""
    d = act(state_dir_path(state_dir, http_port), model, "unload")
    click.echo(f"{d['model']}: {d['state']}")
