"""Running a served repository: Triton (then nginx) until a signal, the access rules nginx enforces,
the endpoints to announce, and an s3:// repository pulled first and refreshed on SIGHUP. The
`serve` command (builder/cli/serve.py) only parses options and calls these."""

from __future__ import annotations

import ipaddress
import re
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from backends.contract.manifest import Manifest, check_runtimes, read_manifest
from backends.errors import InvalidArgumentError, ServeError, UserError
from backends.metrics import DIR_ENV as METRICS_DIR_ENV
from backends.metrics import ENV as METRICS_ENV
from builder.build.deployment import load_deployment_file
from builder.serve import storage
from builder.serve.gateway.keys import KeyStore
from builder.serve.gateway.memory import machine_memory_bytes
from builder.serve.gateway_process import GatewayProcess
from builder.serve.gpu_host import check_serving_host
from builder.serve.metrics_endpoint import MetricsEndpoint
from builder.serve.ports import free_port
from builder.serve.proxy import AccessRules, Proxy, ProxyLayout, StateDir, default_state_dir
from builder.serve.supervision import Supervisor, serve_pieces
from builder.serve.tls import tls_pair
from builder.serve.triton_server import Ports, TritonServer


def endpoints(server: TritonServer, manifest: Manifest, proxy: Proxy | None = None,
              metrics: MetricsEndpoint | None = None) -> list[str]:
    if proxy is None:
        http, grpc = server.http_url, server.grpc_url
    else:
        host = proxy.layout.public_addresses[0]
        host = f"[{host}]" if ":" in host else host
        http, grpc = f"{host}:{proxy.layout.http_port}", f"{host}:{proxy.layout.grpc_port}"
    scheme = proxy.layout.scheme if proxy else "http"
    lines = [
        f"HTTP     {scheme}://{http}  (POST /v2/models/<model>/generate, /generate_stream, /infer)",
        f"gRPC     {grpc}" + ("  (TLS)" if scheme == "https" else ""),
        (f"metrics  {metrics.url}  (Triton, engines and gateway merged; not proxied)" if metrics else
         f"metrics  http://{server.metrics_address or server.address}:{server.ports.metrics}/metrics"
         + ("  (not proxied)" if proxy else "")),
    ]
    if proxy is not None:
        allowed = ", ".join(proxy.rules.allowed_ips) or "everyone (empty list)"
        lines.append(f"allowed  {allowed}")
        keys = "required (Authorization: Bearer KEY; gRPC metadata too)" if proxy.layout.keys_required else \
            "off (--public)"
        if proxy.tls:
            kind = "self-signed, clients trust this file" if proxy.tls.self_signed else "until"
            lines.append(f"TLS      {proxy.tls.cert}  ({kind}"
                         + ("" if proxy.tls.self_signed else f" {proxy.tls.not_after:%Y-%m-%d}") + ")")
            lines.append(f"SHA-256  {proxy.tls.fingerprint}")
        lines.insert(1, f"OpenAI   {scheme}://{http}/v1  (openai SDK base_url; /v1/models, /v1/chat/completions, "
                        "/v1/completions, /v1/embeddings)")
        lines.append(f"API keys {keys}")
        if proxy.rules.trusted_proxies:
            lines.append(f"proxies  X-Forwarded-For trusted from {', '.join(proxy.rules.trusted_proxies)}")
        lines.append(f"state    {proxy.state.path}  (serverless-triton allowed-ips ... --state-dir this)")
    for user_name, entry in sorted(manifest.deployments.items()):
        models = entry.entrypoints
        lines.append(f"model    {user_name:<32} " + "  ".join(f"{k}={v}" for k, v in sorted(models.items())))
    return lines


def run_until_signalled(server: TritonServer, on_ready=None, proxy: Proxy | None = None,
                        gateway: GatewayProcess | None = None, metrics: MetricsEndpoint | None = None,
                        grace: float = 30.0) -> None:
    """Start Triton, then (once it is ready) the OpenAI gateway and nginx; block until SIGINT/SIGTERM,
    restarting any of them that dies (builder/serve/supervision.py).

    On the way out nginx stops first (gracefully: no new connections, requests in flight get up to
    `grace` seconds to finish), then the gateway, then Triton and its stubs.
    """
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if proxy:
            proxy.prepare()  # a config nginx rejects fails before Triton loads anything
        if metrics:
            metrics.start()  # a busy --metrics-port fails before Triton loads anything
        server.start()
        server.wait_ready()
        if gateway:
            gateway.start()
        if proxy:
            proxy.start()
        if on_ready:
            on_ready()
        supervisor = Supervisor(serve_pieces(server, proxy, gateway))
        while not stop.wait(0.5):
            supervisor.check()
    finally:
        if proxy:
            proxy.stop(grace)
        if metrics:
            metrics.stop()
        if gateway:
            gateway.stop()
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


def refuse_rules_without_proxy(deployment: Path | None, allowed_ips, trusted_proxies) -> None:
    """Access rules that nothing would enforce are an error, not a silent open door."""
    serving = load_deployment_file(deployment)[1] if deployment is not None else None
    if allowed_ips or trusted_proxies or (serving and (serving.allowed_ips or serving.trusted_proxies)):
        raise InvalidArgumentError("allowed IPs and trusted proxies are enforced by the proxy: drop --no-proxy "
                                   "(or the --allowed-ip/--trusted-proxy options and [serving] entries)")


def check_loopback(address: str) -> None:
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = address == "localhost"
    if not loopback:
        raise InvalidArgumentError(f"--address {address}: behind the proxy Triton listens on loopback only; "
                                   "use --public-address for nginx, or --no-proxy to expose Triton itself")


def build_proxy(http_port: int, grpc_port: int, address: str, public_addresses, state_dir: Path | None,
                deployment: Path | None, allowed_ips, trusted_proxies, keys_required: bool = True,
                wake_on_request: bool = False, max_body_bytes: int = 32 << 20,
                tls: TlsOptions | None = None, metrics_port: int = 0,
                metrics_address: str | None = None) -> tuple[Ports, Proxy]:
    """Triton's internal ports and the nginx front that owns the public ones (with the OpenAI
    gateway on a loopback port of its own behind /v1, and as the key check of /v2 and gRPC).
    A TLS pair is checked here, before anything starts."""
    check_loopback(address)
    internal = Ports(free_port(address), free_port(address))
    state = StateDir(Path(state_dir) if state_dir else default_state_dir(http_port))
    tls = tls or TlsOptions()
    pair = tls_pair(tls.mode, tls.cert, tls.key, state.path, tuple(public_addresses))
    host = f"[{address}]" if ":" in address else address
    layout = ProxyLayout(http_port, grpc_port, f"{host}:{internal.http}", f"{host}:{internal.grpc}",
                         tuple(public_addresses), gateway=f"127.0.0.1:{free_port()}",
                         grpc_relay=f"127.0.0.1:{free_port()}", keys_required=keys_required,
                         wake_on_request=wake_on_request, max_body_bytes=max_body_bytes,
                         tls_cert=str(pair.cert) if pair else "", tls_key=str(pair.key) if pair else "",
                         metrics=_host_port(metrics_address or address, metrics_port) if metrics_port else "")
    rules = access_rules(state, deployment, allowed_ips, trusted_proxies)
    return internal, Proxy(state, layout, rules, tls=pair)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class TlsOptions:
    """serve's --tls self-signed, or --tls-cert and --tls-key (all None: plain HTTP)."""

    mode: str | None = None
    cert: Path | None = None
    key: Path | None = None


def gateway_for(proxy: Proxy, server: TritonServer, repository: Path, idle: IdleTimeouts | None = None,
                hold_limit: float = 120.0, memory_budget: int = 0, metrics: bool = True,
                queues: QueueBounds | None = None) -> GatewayProcess:
    """The gateway behind this proxy: keys from the proxy's state directory, log beside nginx's."""
    port = int(proxy.layout.gateway.rsplit(":", 1)[1])
    idle = idle or IdleTimeouts()
    queues = queues or QueueBounds()
    return GatewayProcess(server.http_url, repository, proxy.state.path, port, public=not proxy.layout.keys_required,
                          max_body_bytes=proxy.layout.max_body_bytes, idle_timeout=idle.default,
                          idle_timeouts=idle.by_name, max_queue=queues.default, max_queues=queues.by_name,
                          hold_limit=hold_limit, memory_budget=memory_budget, log_path=proxy.state.logs / "gateway.log",
                          metrics=metrics,
                          triton_grpc=proxy.layout.triton_grpc,
                          grpc_port=int(proxy.layout.grpc_relay.rsplit(":", 1)[1]) if proxy.layout.grpc_relay else 0)


def metrics_endpoint(address: str, port: int, triton_port: int, gateway: GatewayProcess | None,
                     engines: Path | None) -> MetricsEndpoint:
    """serve's one metrics endpoint on address:port, merging Triton's (on loopback `triton_port`),
    the engines' (files in `engines`) and the gateway's series (docs/monitoring.md)."""
    return MetricsEndpoint(address, port, f"127.0.0.1:{triton_port}", gateway.address if gateway else None, engines)


def engine_metrics_dir(on: bool) -> Path | None:
    """A fresh directory for this run's engine series (None: --no-metrics); serve removes it on exit."""
    return Path(tempfile.mkdtemp(prefix="serverless-triton-metrics-")) if on else None


def engine_metrics_environment(directory: Path | None) -> dict[str, str]:
    """Triton's environment for the engines' own series (read by backends/metrics.py in every stub)."""
    return {METRICS_DIR_ENV: str(directory)} if directory is not None else {METRICS_ENV: "off"}


@dataclass(frozen=True)
class IdleTimeouts:
    """Scale to zero: seconds without requests before a deployment is unloaded (0: never)."""

    default: float = 0.0
    by_name: dict[str, float] = field(default_factory=dict)     # [[models]] idle_timeout, by name

    @property
    def any(self) -> bool:
        return self.default > 0 or any(v > 0 for v in self.by_name.values())


@dataclass(frozen=True)
class QueueBounds:
    """Backpressure: requests a deployment queues past its max_batch_size before answering 429
    (None: the gateway's default, builder/serve/gateway/backpressure.py)."""

    default: int | None = None
    by_name: dict[str, int] = field(default_factory=dict)     # [[models]] max_queue, by name


def queue_bounds(default: int | None, deployment: Path | None) -> QueueBounds:
    """--max-queue, and each [[models]] max_queue of the deployment file."""
    if default is not None and default < 0:
        raise InvalidArgumentError(f"--max-queue {default} is negative: give a number of requests (0: no queue)")
    specs = load_deployment_file(deployment)[0] if deployment is not None else []
    return QueueBounds(default, {s.name: s.max_queue for s in specs if s.max_queue is not None})


def idle_timeouts(default: float, deployment: Path | None) -> IdleTimeouts:
    """--idle-timeout, and each [[models]] idle_timeout of the deployment file."""
    if default < 0:
        raise InvalidArgumentError(f"--idle-timeout {default} is negative: give seconds, or 0 to never unload")
    specs = load_deployment_file(deployment)[0] if deployment is not None else []
    return IdleTimeouts(default, {s.name: float(s.idle_timeout) for s in specs if s.idle_timeout is not None})


def key_hint(proxy: Proxy) -> str | None:
    """What to do when keys are required and none exists yet (the first serve)."""
    if not proxy.layout.keys_required or KeyStore(proxy.state.path).list():
        return None
    return (f"no API key yet: every call needs one; create it with `serverless-triton api-keys create NAME "
            f"--state-dir {proxy.state.path}` (or serve --public to turn keys off)")


def pull_for_serve(url: str, endpoint_url: str | None, echo: Callable[[str], None]) -> Path:
    """`serve --repository s3://...`: pull into this location's cache directory, return it."""
    directory = storage.default_cache_dir(url, endpoint_url)
    report = storage.pull(url, directory, endpoint_url=endpoint_url)
    echo(report.summary())
    return directory


def refresh_on_sighup(url: str, directory: Path, server_url: str, endpoint_url: str | None,
                      echo: Callable[..., None]) -> Callable[[], None]:
    """Refresh from `url` whenever the process gets SIGHUP; returns a function that undoes it.

    The signal handler only wakes a worker thread: pulling and loading happen off the main loop,
    one refresh at a time (signals arriving meanwhile fold into one more refresh).
    """
    wake, done = threading.Event(), threading.Event()

    def work() -> None:
        while True:
            wake.wait()
            wake.clear()
            if done.is_set():
                return
            try:
                report = storage.refresh(url, directory, server_url, endpoint_url=endpoint_url, quiet=True)
                echo("refresh: " + report.summary())
            except UserError as e:
                echo(f"refresh failed: {e}", err=True)

    previous = signal.signal(signal.SIGHUP, lambda *_: wake.set())
    threading.Thread(target=work, name="sighup-refresh", daemon=True).start()

    def undo() -> None:
        signal.signal(signal.SIGHUP, previous)
        done.set()
        wake.set()

    return undo


def open_repository(repository: str, endpoint_url: str | None, echo: Callable[[str], None]) -> tuple[Path, Manifest]:
    """The local repository to serve (pulled first when it is s3://...) and its manifest, refused
    when its runtime code was altered or its GPU engines cannot run on this host."""
    repo = pull_for_serve(repository, endpoint_url, echo) if storage.is_s3_url(repository) else Path(repository)
    if not repo.is_dir():
        raise ServeError(f"model repository {repo} does not exist: run build-engines first")
    manifest = read_manifest(repo)
    check_runtimes(repo, manifest)
    check_serving_host(manifest)  # GPU engines only load on the GPU/TensorRT they were built for
    return repo, manifest


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[kKmMgGtT](?:i?[bB])?|[bB]?)\s*$")


def parse_memory_budget(value: str) -> int:
    """`80%` (of this machine's memory), `12G`, `12GiB`, `800M`, or bytes; `0` for no budget."""
    m = _SIZE.match(value or "")
    if not m:
        raise InvalidArgumentError(f"memory budget {value!r} is not a size: write e.g. 80%, 12G or 800M (0: none)")
    number, unit = float(m[1]), m[2][:1].upper()
    if unit == "%":
        if not 0 < number <= 100:
            raise InvalidArgumentError(f"memory budget {value!r}: a share of the machine is 1% to 100%")
        return int(machine_memory_bytes() * number / 100)
    return int(number * {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])