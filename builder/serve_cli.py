"""`serverless-triton serve`: Triton behind nginx (allowed IPs) until Ctrl-C or SIGTERM.

By default Triton listens on loopback on free ports and nginx owns the public HTTP and gRPC ports
(see builder/proxy.py and docs/proxy.md). `--no-proxy` serves Triton directly for local work.
"""

from __future__ import annotations

import ipaddress
import signal
import threading
from pathlib import Path

import click

from builder.cli_base import Command
from builder.deployment import load_deployment_file
from builder.engines.tensorrt_llm import check_serving_host, mpi_world
from builder.errors import InvalidArgumentError, ProxyError, ServeError
from builder.manifest import read_manifest
from builder.proxy import AccessRules, Proxy, ProxyLayout, StateDir, default_state_dir, free_port
from builder.repo_cli import pull_for_serve, refresh_on_sighup
from builder.storage import is_s3_url
from builder.triton_server import Ports, TritonServer


def _endpoints(server: TritonServer, manifest: dict, proxy: Proxy | None = None) -> list[str]:
    if proxy is None:
        http, grpc = server.http_url, server.grpc_url
    else:
        host = proxy.layout.public_addresses[0]
        host = f"[{host}]" if ":" in host else host
        http, grpc = f"{host}:{proxy.layout.http_port}", f"{host}:{proxy.layout.grpc_port}"
    lines = [
        f"HTTP     http://{http}  (POST /v2/models/<model>/generate, /generate_stream, /infer)",
        f"gRPC     {grpc}",
        f"metrics  http://{server.address}:{server.ports.metrics}/metrics" + ("  (loopback only)" if proxy else ""),
    ]
    if proxy is not None:
        allowed = ", ".join(proxy.rules.allowed_ips) or "everyone (empty list)"
        lines.append(f"allowed  {allowed}")
        if proxy.rules.trusted_proxies:
            lines.append(f"proxies  X-Forwarded-For trusted from {', '.join(proxy.rules.trusted_proxies)}")
        lines.append(f"state    {proxy.state.path}  (serverless-triton allowed-ips ... --state-dir this)")
    for user_name, entry in sorted(manifest.get("deployments", {}).items()):
        models = entry.get("entrypoints", {})
        lines.append(f"model    {user_name:<32} " + "  ".join(f"{k}={v}" for k, v in sorted(models.items())))
    return lines


def run_until_signalled(server: TritonServer, on_ready=None, proxy: Proxy | None = None) -> None:
    """Start Triton (then nginx, once Triton is ready), block until SIGINT/SIGTERM or either dies.

    On the way out nginx stops first (gracefully), then Triton and its Python stubs.
    """
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if proxy:
            proxy.prepare()  # a config nginx rejects fails before Triton loads anything
        server.start()
        server.wait_ready()
        if proxy:
            proxy.start()
        if on_ready:
            on_ready()
        while not stop.wait(0.5):
            if server.process is None or server.process.poll() is not None:
                raise ServeError("tritonserver exited unexpectedly: see its log")
            if proxy and not proxy.running():
                raise ProxyError(f"nginx exited unexpectedly: see {proxy.state.error_log}")
    finally:
        if proxy:
            proxy.stop()
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def access_rules(state: StateDir, deployment: Path | None, allowed_ips, trusted_proxies) -> AccessRules:
    """Rules from the deployment file plus options; a list given nowhere keeps the saved one.

    Keeping the saved list means a restart never silently opens a restricted deployment to
    everyone; `allowed-ips set --everyone` does that explicitly.
    """
    file_allowed, file_trusted = [], []
    if deployment is not None:
        _, serving = load_deployment_file(deployment)
        file_allowed, file_trusted = serving.allowed_ips, serving.trusted_proxies
    fresh = AccessRules.parse([*file_allowed, *allowed_ips], [*file_trusted, *trusted_proxies])
    saved = state.read_rules() or AccessRules()
    return AccessRules(fresh.allowed_ips or saved.allowed_ips, fresh.trusted_proxies or saved.trusted_proxies)


def _refuse_rules_without_proxy(deployment: Path | None, allowed_ips, trusted_proxies) -> None:
    """Access rules that nothing would enforce are an error, not a silent open door."""
    serving = load_deployment_file(deployment)[1] if deployment is not None else None
    if allowed_ips or trusted_proxies or (serving and (serving.allowed_ips or serving.trusted_proxies)):
        raise InvalidArgumentError("allowed IPs and trusted proxies are enforced by the proxy: drop --no-proxy "
                                   "(or the --allowed-ip/--trusted-proxy options and [serving] entries)")


def _check_loopback(address: str) -> None:
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = address == "localhost"
    if not loopback:
        raise InvalidArgumentError(f"--address {address}: behind the proxy Triton listens on loopback only; "
                                   "use --public-address for nginx, or --no-proxy to expose Triton itself")


def build_proxy(http_port: int, grpc_port: int, address: str, public_addresses, state_dir: Path | None,
                deployment: Path | None, allowed_ips, trusted_proxies) -> tuple[Ports, Proxy]:
    """Triton's internal ports and the nginx front that owns the public ones."""
    _check_loopback(address)
    internal = Ports(free_port(address), free_port(address))
    state = StateDir(Path(state_dir) if state_dir else default_state_dir(http_port))
    host = f"[{address}]" if ":" in address else address
    layout = ProxyLayout(http_port, grpc_port, f"{host}:{internal.http}", f"{host}:{internal.grpc}",
                         tuple(public_addresses))
    rules = access_rules(state, deployment, allowed_ips, trusted_proxies)
    return internal, Proxy(state, layout, rules)


@click.command(cls=Command)
@click.option("--repository", "-r", required=True,
              help="Model repository directory written by build-engines, or s3://BUCKET/PREFIX (pulled into "
                   "a local cache first; SIGHUP pulls again and reloads changed models).")
@click.option("--endpoint-url", metavar="URL", help="S3-compatible endpoint for an s3:// repository.")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="Public HTTP port (nginx; Triton's own with --no-proxy).")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535),
              help="Public gRPC port (nginx; Triton's own with --no-proxy).")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535),
              help="Triton's metrics port, on --address (never proxied).")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address Triton listens on (loopback only unless --no-proxy).")
@click.option("--public-address", "public_addresses", multiple=True, default=("0.0.0.0",), show_default=True,
              help="Address nginx listens on; repeat for several (e.g. 0.0.0.0 and ::).")
@click.option("--allowed-ip", "allowed_ips", multiple=True, metavar="IP|CIDR",
              help="Client address or block allowed in; repeatable. None anywhere: everyone.")
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="IP|CIDR",
              help="Proxy whose X-Forwarded-For header gives the client address; repeatable.")
@click.option("--deployment", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Deployment file; its [serving] allowed_ips / trusted_proxies are used.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="nginx config, pid, logs and allowed_ips.json [default: ~/.cache/serverless-triton/serve-HTTP_PORT]")
@click.option("--no-proxy", is_flag=True, help="Serve Triton directly, without nginx (local development).")
@click.option("--tritonserver", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="tritonserver binary (default: the one bundled in nvidia-pytriton).")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Write Triton's log here.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for every model to be ready.")
def serve(repository, endpoint_url, http_port, grpc_port, metrics_port, address, public_addresses, allowed_ips,
          trusted_proxies, deployment, state_dir, no_proxy, tritonserver, log_file, timeout):
    """Serve a model repository with tritonserver behind nginx until Ctrl-C or SIGTERM.

    Loads every model, waits until each one is READY, starts nginx on the public ports with the
    allowed IPs, prints the endpoints, and on exit stops nginx gracefully, then Triton and its
    Python stubs (no orphan processes). Change the allowed IPs while it runs with
    `serverless-triton allowed-ips`.
    """
    from_store = is_s3_url(repository)
    repo = pull_for_serve(repository, endpoint_url) if from_store else Path(repository)
    manifest = read_manifest(repo)
    check_serving_host(manifest)  # GPU engines only load on the GPU/TensorRT they were built for
    world_size, rank_models = mpi_world(manifest)
    proxy = None
    if no_proxy:
        _refuse_rules_without_proxy(deployment, allowed_ips, trusted_proxies)
        ports = Ports(http_port, grpc_port, metrics_port)
    else:
        internal, proxy = build_proxy(http_port, grpc_port, address, public_addresses, state_dir, deployment,
                                      allowed_ips, trusted_proxies)
        ports = Ports(internal.http, internal.grpc, metrics_port)
    server = TritonServer(repo, ports, address=address, tritonserver=tritonserver, log_path=log_file,
                          ready_timeout=timeout, mpi_world_size=world_size, rank_models=rank_models)

    def announce() -> None:
        click.echo("ready")
        for line in _endpoints(server, manifest, proxy):
            click.echo("  " + line)
        click.echo("Ctrl-C to stop.")

    click.echo(f"starting tritonserver on {repo} ...")
    undo = refresh_on_sighup(repository, repo, server.http_url, endpoint_url) if from_store else (lambda: None)
    try:
        run_until_signalled(server, announce, proxy)
    finally:
        undo()
    click.echo("stopped")
