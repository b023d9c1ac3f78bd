"""`serverless-triton serve`: Triton and the OpenAI gateway behind nginx (allowed IPs, API keys)
until Ctrl-C or SIGTERM.

By default Triton and the gateway listen on loopback on free ports and nginx owns the public HTTP
and gRPC ports (see builder/serve/proxy.py, docs/proxy.md and docs/openai-api.md). `--no-proxy`
serves Triton directly for local work (no /v1, no keys).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from backends.errors import ProxyError
from builder.cli.base import Command
from builder.serve.gpu_host import mpi_world
from builder.serve.ports import free_port
from builder.serve.serving import (
    TlsOptions,
    build_proxy,
    endpoints,
    engine_metrics_dir,
    engine_metrics_environment,
    gateway_for,
    idle_timeouts,
    key_hint,
    metrics_endpoint,
    open_repository,
    parse_memory_budget,
    queue_bounds,
    refresh_on_sighup,
    refuse_rules_without_proxy,
    run_until_signalled,
)
from builder.serve.storage import is_s3_url
from builder.serve.triton_server import DEFAULT_EXIT_TIMEOUT_S, DRAINED_EXIT_TIMEOUT_S, Ports, TritonServer


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
              help="The Prometheus endpoint (Triton, engines and gateway merged), on --metrics-address; never "
                   "proxied.")
@click.option("--metrics-address", metavar="ADDRESS",
              help="Address of the metrics endpoint [default: --address] (0.0.0.0 in a pod, for its ServiceMonitor).")
@click.option("--no-metrics", is_flag=True,
              help="Record none of serverless-triton's own series (engines, gateway); Triton's nv_* stay.")
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
              help="nginx config, pid, logs and allowed_ips.json [default: $XDG_CACHE_HOME/serverless-triton/serve-HTTP_PORT]")
@click.option("--public", is_flag=True,
              help="No API keys: anyone the allowed IPs let in may call /v1, /v2 and gRPC.")
@click.option("--max-body-size", default=32, show_default=True, type=click.IntRange(1, 1024), metavar="MIB",
              help="Largest /v1 request body in MiB (413 above).")
@click.option("--idle-timeout", default=300.0, show_default=True, type=float, metavar="SECONDS",
              help="Scale to zero: unload a deployment after this long without requests; the next request "
                   "wakes it. 0: never. [[models]] idle_timeout in --deployment overrides it per model.")
@click.option("--memory-budget", default="80%", show_default=True, metavar="SIZE",
              help="Memory the loaded deployments may hold (80%, 12G, 800M; 0: none): a deployment that would "
                   "exceed it first unloads the least recently used idle ones, else answers 503.")
@click.option("--wake-timeout", default=120.0, show_default=True, type=float, metavar="SECONDS",
              help="Longest a request waits for its deployment to load (then 503 with Retry-After).")
@click.option("--tls", "tls_mode", type=click.Choice(["self-signed"]),
              help="HTTPS and gRPC over TLS with a key pair made once and kept in the state directory "
                   "(prints its SHA-256 fingerprint; clients trust STATE/tls/self-signed.crt).")
@click.option("--tls-cert", type=click.Path(path_type=Path), metavar="FILE",
              help="PEM certificate chain (leaf first) for HTTPS and gRPC over TLS on the public ports.")
@click.option("--tls-key", type=click.Path(path_type=Path), metavar="FILE",
              help="PEM private key of --tls-cert (unencrypted; keep it mode 0600). "
                   "Replace both files and run `serverless-triton tls reload` to swap them live.")
@click.option("--max-queue", type=click.IntRange(0), metavar="N",
              help="Requests a deployment queues past its max_batch_size; more get 429 with Retry-After at once "
                   "[default: 2 x max_batch_size; a deployment file's [[models]] max_queue wins].")
@click.option("--grace", default=30.0, show_default=True, type=click.FloatRange(0), metavar="SECONDS",
              help="On SIGTERM/Ctrl-C: new connections are refused at once, requests in flight get this long to "
                   "finish, then everything stops.")
@click.option("--no-proxy", is_flag=True,
              help="Serve Triton directly, without nginx, the OpenAI API or keys (local development).")
@click.option("--tritonserver", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="tritonserver binary (default: the one bundled in nvidia-pytriton).")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Write Triton's log here.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for every model to be ready.")
def serve(repository, endpoint_url, http_port, grpc_port, metrics_port, metrics_address, address, public_addresses,
          allowed_ips, trusted_proxies, deployment, state_dir, public, max_body_size, idle_timeout, memory_budget,
          wake_timeout, tls_mode, tls_cert, tls_key, no_proxy, tritonserver, log_file, timeout, no_metrics=False,
          max_queue=None, grace=30.0):
    """Serve a model repository with tritonserver behind nginx until Ctrl-C or SIGTERM.

    Loads every model, waits until each one is READY, starts the OpenAI gateway (/v1) and nginx on
    the public ports with the allowed IPs and API keys, prints the endpoints, and on exit stops
    nginx gracefully, then the gateway, then Triton and its Python stubs (no orphan processes).
    Change the allowed IPs and keys while it runs with `serverless-triton allowed-ips` and
    `serverless-triton api-keys`. With --tls-cert/--tls-key or --tls self-signed both public ports
    speak TLS 1.2/1.3 only; `serverless-triton tls reload` swaps renewed files in without a restart.
    """
    proxy = None
    tls = TlsOptions(tls_mode, tls_cert, tls_key)
    if no_proxy:
        refuse_rules_without_proxy(deployment, allowed_ips, trusted_proxies)
        if tls != TlsOptions():
            raise ProxyError("TLS is served by the proxy: drop --no-proxy (or the --tls options)")
        ports = Ports(http_port, grpc_port, free_port("127.0.0.1"))
    else:
        idle = idle_timeouts(idle_timeout, deployment)
        internal, proxy = build_proxy(http_port, grpc_port, address, public_addresses, state_dir, deployment,
                                      allowed_ips, trusted_proxies, keys_required=not public,
                                      # `unload` and the memory budget unload even with no idle timeout
                                      wake_on_request=True, max_body_bytes=max_body_size << 20, tls=tls,
                                      metrics_port=metrics_port, metrics_address=metrics_address)
        ports = Ports(internal.http, internal.grpc, free_port("127.0.0.1"))
    repo, manifest = open_repository(repository, endpoint_url, click.echo)   # after the TLS check: fail fast
    world_size, rank_models = mpi_world(manifest)
    # Triton's metrics stay on loopback: the endpoint on --metrics-port merges them with the engines'
    # and the gateway's
    engine_metrics = engine_metrics_dir(not no_metrics)
    server = TritonServer(repo, ports, address=address, metrics_address="127.0.0.1", tritonserver=tritonserver,
                          log_path=log_file,
                          ready_timeout=timeout, mpi_world_size=world_size,
                          exit_timeout_s=DRAINED_EXIT_TIMEOUT_S if proxy else DEFAULT_EXIT_TIMEOUT_S,
                          rank_models=rank_models, environment=engine_metrics_environment(engine_metrics))
    gateway = gateway_for(proxy, server, repo, idle, wake_timeout, parse_memory_budget(memory_budget),
                          metrics=not no_metrics, queues=queue_bounds(max_queue, deployment)) if proxy else None
    metrics = metrics_endpoint(metrics_address or address, metrics_port, ports.metrics, gateway, engine_metrics)

    def announce() -> None:
        click.echo("ready")
        for line in endpoints(server, manifest, proxy, metrics):
            click.echo("  " + line)
        hint = key_hint(proxy) if proxy else None
        if hint:
            click.echo(hint)
        click.echo("Ctrl-C to stop.")

    click.echo(f"starting tritonserver on {repo} ...")
    from_store = is_s3_url(repository)
    undo = (refresh_on_sighup(repository, repo, server.http_url, endpoint_url, click.echo) if from_store
            else (lambda: None))
    try:
        run_until_signalled(server, announce, proxy, gateway, metrics, grace=grace)
    finally:
        undo()
        if engine_metrics is not None:
            shutil.rmtree(engine_metrics, ignore_errors=True)
    click.echo("stopped")
