"""serve's one Prometheus endpoint (`--metrics-port` on `--metrics-address`): Triton's nv_* series
(from its metrics port on loopback), the engines' serverless_triton_* series (the files Triton's
Python stubs write, backends/metrics.py) and the gateway's (its loopback GET /metrics), as one text.

Triton's series name Triton models (`smollm2-135m-instruct-int8-engine`); where such a model
belongs to one deployment the merge relabels `model` to the user-facing `name:precision` and keeps
the Triton name in `triton_model` (models shared by every precision keep their name in both).
Families two sources know (`serverless_triton_request_errors_total`: engine errors from the
engines, client errors from the gateway) are written once with every sample. A source that does not answer
is left out and `serverless_triton_metrics_source_up{source}` says so. Runs as a thread of serve.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from backends.contract.naming import deployment_of
from backends.errors import ServeError
from backends.metrics import PREFIX, SPECS

log = logging.getLogger("serverless_triton.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SOURCE_TIMEOUT = 5.0


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?(\s+.*)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def relabel(labels: dict[str, str]) -> dict[str, str]:
    """`model` as users name deployments, the Triton model kept in `triton_model`."""
    model = labels.get("model")
    if model is None or "triton_model" in labels:
        return labels
    return {**labels, "model": deployment_of(model) or model, "triton_model": model}


def relabel_line(line: str) -> str:
    """One sample line with its labels relabelled; names, values and escapes kept as they were."""
    m = _SAMPLE.match(line)
    if not m or not m.group(2):
        return line
    labels = dict(_LABEL.findall(m.group(2)))
    if "model" not in labels or "triton_model" in labels:
        return line
    body = ",".join(f'{k}="{v}"' for k, v in relabel(labels).items())
    return f"{m.group(1)}{{{body}}}{m.group(3)}"


@dataclass
class _Family:
    headers: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def blocks(text: str) -> dict[str, _Family]:
    """The families of one exposition text, by the name their HELP/TYPE lines give."""
    out: dict[str, _Family] = {}
    current = ""
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = parts[2]
                family = out.setdefault(current, _Family())
                if not any(h.split(None, 2)[1] == parts[1] for h in family.headers):
                    family.headers.append(line)
            continue
        name = line.split("{", 1)[0].split(None, 1)[0]
        if not current or not name.startswith(current):
            current = name
        out.setdefault(current, _Family()).samples.append(line)
    return out


def merge(triton: str, *others: str) -> str:
    """One exposition text: Triton's samples relabelled, then the others'; a family both know is
    written once (the first HELP/TYPE) with every sample."""
    merged: dict[str, _Family] = {}
    for text, relabelled in ((triton, True), *((o, False) for o in others)):
        families = blocks(text)
        for name, family in families.items():
            into = merged.setdefault(name, _Family(list(family.headers)))
            into.samples += [relabel_line(s) for s in family.samples] if relabelled else family.samples
    lines = [line for f in merged.values() for line in (*f.headers, *f.samples)]
    return "\n".join(lines) + "\n"


def engine_series(directory: Path) -> str:
    """The engines' series: every Triton stub's files in `directory` added up (backends/metrics.py),
    gauges of stubs that are gone dropped, each family with its own HELP (the collector's is generic)."""
    for path in directory.glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1]) if path.stem.rsplit("_", 1)[1].isdigit() else 0
        if pid and not _alive(pid):
            mark_process_dead(pid, str(directory))
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=str(directory))
    text = generate_latest(registry).decode()
    helps = {f"# HELP {PREFIX}{name}{'_total' if spec.kind == 'counter' else ''} ":
             spec.description for name, spec in SPECS.items()}
    lines = []
    for line in text.splitlines():
        head = next((h for h in helps if line.startswith(h)), None)
        lines.append(head + helps[head] if head else line)
    return "\n".join(lines) + "\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=SOURCE_TIMEOUT) as r:
            return r.read().decode()
    except (OSError, ValueError) as e:
        log.warning("metrics source %s did not answer: %s", url, e)
        return None


def source_up(up: dict[str, bool]) -> str:
    lines = ["# HELP serverless_triton_metrics_source_up 1 if the source answered this scrape",
             "# TYPE serverless_triton_metrics_source_up gauge"]
    lines += [f'serverless_triton_metrics_source_up{{source="{k}"}} {int(v)}' for k, v in up.items()]
    return "\n".join(lines) + "\n"


@dataclass
class MetricsEndpoint:
    """GET /metrics on address:port; `triton` and `gateway` are the loopback host:port to merge."""

    address: str
    port: int
    triton: str
    gateway: str | None = None
    engines: Path | None = None         # the Triton stubs' metric files (None: serve --no-metrics)
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def scrape(self) -> str:
        sources = {"triton": f"http://{self.triton}/metrics"}
        if self.gateway:
            sources["gateway"] = f"http://{self.gateway}/metrics"
        texts = {name: fetch(url) for name, url in sources.items()}
        up = {name: text is not None for name, text in texts.items()}
        engines = engine_series(self.engines) if self.engines is not None and self.engines.is_dir() else ""
        return merge(texts["triton"] or "", engines, *(t for n, t in texts.items() if n != "triton" and t),
                     source_up(up))

    def start(self) -> MetricsEndpoint:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only GET /metrics is served here")
                    return
                try:
                    body = endpoint.scrape().encode()
                except Exception as e:  # noqa: BLE001 -- a malformed source text must not kill the endpoint
                    log.error("metrics merge failed: %s", e)
                    self.send_error(502, f"the metrics sources could not be merged: {type(e).__name__}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # no access log
                pass

        server_class = type("Server", (ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in self.address else socket.AF_INET, "daemon_threads": True})
        try:
            self._server = server_class((self.address, self.port), Handler)
        except OSError as e:
            raise ServeError(f"the metrics endpoint cannot listen on {self.address}:{self.port} ({e.strerror}): "
                             "pick another --metrics-port or --metrics-address") from None
        threading.Thread(target=self._server.serve_forever, name="metrics-endpoint", daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
