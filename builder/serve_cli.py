"""`serverless-triton serve`: run tritonserver on a model repository until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from builder.errors import ServeError
from builder.manifest import read_manifest
from builder.triton_server import Ports, TritonServer


def _endpoints(server: TritonServer, manifest: dict) -> list[str]:
    lines = [
        f"HTTP     http://{server.http_url}  (POST /v2/models/<model>/generate, /generate_stream, /infer)",
        f"gRPC     {server.grpc_url}",
        f"metrics  http://{server.address}:{server.ports.metrics}/metrics",
    ]
    for user_name, entry in sorted(manifest.get("deployments", {}).items()):
        models = entry.get("entrypoints", {})
        lines.append(f"model    {user_name:<32} " + "  ".join(f"{k}={v}" for k, v in sorted(models.items())))
    return lines


def run_until_signalled(server: TritonServer, on_ready=None) -> None:
    """Start, wait for readiness, block until SIGINT/SIGTERM or the server dies, then stop."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        server.wait_ready()
        if on_ready:
            on_ready()
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                raise ServeError("tritonserver exited unexpectedly: see its log")
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


@click.command()
@click.option("--repository", "-r", required=True, help="Model repository directory written by build-engines.")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535))
@click.option("--address", default="127.0.0.1", show_default=True, help="Address Triton listens on.")
@click.option("--tritonserver", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="tritonserver binary (default: the one bundled in nvidia-pytriton).")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Write Triton's log here.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for every model to be ready.")
def serve(repository, http_port, grpc_port, metrics_port, address, tritonserver, log_file, timeout):
    """Serve a model repository with tritonserver until Ctrl-C or SIGTERM.

    Loads every model, waits until each one is READY, prints the endpoints, and on exit stops
    Triton and its Python stubs (no orphan processes).
    """
    repo = Path(repository)
    manifest = read_manifest(repo)
    server = TritonServer(repo, Ports(http_port, grpc_port, metrics_port), address=address,
                          tritonserver=tritonserver, log_path=log_file)
    orig_wait = server.wait_ready
    server.wait_ready = lambda: orig_wait(timeout)  # type: ignore[method-assign]

    def announce() -> None:
        click.echo("ready")
        for line in _endpoints(server, manifest):
            click.echo("  " + line)
        click.echo("Ctrl-C to stop.")

    click.echo(f"starting tritonserver on {repo} ...")
    run_until_signalled(server, announce)
    click.echo("stopped")
