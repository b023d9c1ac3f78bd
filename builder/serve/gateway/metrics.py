"""The gateway's Prometheus series: what only the gateway knows (docs/monitoring.md).

- `serverless_triton_api_key_tokens_total{api_key,model,type}`: the usage each /v1 answer
  carried, by the key's *name* (never the key);
- `serverless_triton_http_requests_total{route,code}`: every answer, by route template;
- `serverless_triton_request_errors_total{model,reason="client error"}`: /v1 requests for a served
  deployment answered with a 4xx (the gateway's refusals and Triton's, relayed); inside Triton
  nothing counts client errors, so each is counted once;
- `serverless_triton_cold_starts_total`, `serverless_triton_cold_start_seconds` (loads on demand)
  and `serverless_triton_model_loaded` (read from the lifecycle at scrape time).

One registry per app (tests build several); `GET /metrics` on the gateway's loopback port serves
it, and serve's metrics endpoint merges it with Triton's. nginx never routes /metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

prometheus_client.disable_created_metrics()   # no *_created series: Triton has none either

COLD_START_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
UNCOUNTED_PATHS = ("/metrics", "/health")     # scrapes and the supervisor's checks
TOKEN_TYPES = {"prompt_tokens": "prompt", "completion_tokens": "generation"}


class _Loaded(Collector):
    """`serverless_triton_model_loaded{model}`: 1 while the deployment is loaded, read at scrape time."""

    def __init__(self, states: Callable[[], dict[str, bool]]):
        self.states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("serverless_triton_model_loaded", "1 while the deployment is loaded in Triton",
                                   labels=["model"])
        for model, loaded in sorted(self.states().items()):
            family.add_metric([model], 1.0 if loaded else 0.0)
        yield family


class GatewayMetrics:
    def __init__(self, loaded: Callable[[], dict[str, bool]] | None = None, on: bool = True):
        self.on, self.loaded = on, loaded
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.key_tokens = Counter("serverless_triton_api_key_tokens", "Tokens of the usage answered to each API "
                                  "key (its name), by model and type (prompt | generation | embedding)",
                                  ["api_key", "model", "type"], registry=r)
        self.http_requests = Counter("serverless_triton_http_requests", "Gateway answers by route template and "
                                     "status code", ["route", "code"], registry=r)
        self.errors = Counter("serverless_triton_request_errors", "Requests that failed, by reason (engine error, "
                              "cancelled: engine; client error: gateway)", ["model", "reason"], registry=r)
        self.cold_starts = Counter("serverless_triton_cold_starts", "Deployments loaded on demand (scale to zero)",
                                   ["model"], registry=r)
        self.cold_start_seconds = Histogram("serverless_triton_cold_start_seconds", "Seconds a load on demand "
                                            "took", ["model"], buckets=COLD_START_BUCKETS, registry=r)
        if on and loaded is not None:
            r.register(_Loaded(loaded))

    def usage(self, key_name: str | None, model: str, usage: dict[str, Any], embedding: bool = False) -> None:
        """The usage one answer carried, counted for its key (no key: a public gateway, nothing to bill)."""
        if not self.on or key_name is None:
            return
        if embedding:
            self.key_tokens.labels(key_name, model, "embedding").inc(int(usage.get("prompt_tokens", 0)))
            return
        for field, kind in TOKEN_TYPES.items():
            self.key_tokens.labels(key_name, model, kind).inc(int(usage.get(field, 0)))

    def cold_start(self, model: str, seconds: float) -> None:
        if self.on:
            self.cold_starts.labels(model).inc()
            self.cold_start_seconds.labels(model).observe(seconds)

    def answered(self, route: str, code: int, deployment: str | None) -> None:
        if not self.on:
            return
        self.http_requests.labels(route, str(code)).inc()
        if deployment and 400 <= code < 500:
            self.errors.labels(deployment, "client error").inc()

    def text(self) -> bytes:
        if not self.on:
            return b""
        # Every deployment's cold-start series exists from 0 on: Prometheus's increase() and rate()
        # never count a series' first sample, so a series born at 1 would hide the first cold start.
        for model in (self.loaded() if self.loaded else {}):
            self.cold_starts.labels(model)
            self.cold_start_seconds.labels(model)
        return prometheus_client.generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: one `answered` per response, by route template (`/v1/chat/completions`,
    never the raw path) and the deployment the route resolved (`request.state.deployment`)."""

    def __init__(self, app, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.metrics.on or scope.get("path") in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.answered(template, status, (scope.get("state") or {}).get("deployment"))


def note_deployment(request, model: Any) -> None:
    """The served deployment a body names (as the catalog resolves it), for the client-error count
    of its answer; a name that is no deployment labels nothing (no unbounded label values)."""
    if isinstance(model, str):
        dep = request.app.state.gateway.catalog.find(model)
        if dep is not None:
            request.state.deployment = dep.id


def usage_recorder(request, metrics: GatewayMetrics, model: str,
                   embedding: bool = False) -> Callable[[dict[str, Any]], None]:
    """`record(usage)` for the key this request came with (set by state.require_key)."""
    key_name = getattr(request.state, "key_name", None)
    return lambda usage: metrics.usage(key_name, model, usage, embedding)
