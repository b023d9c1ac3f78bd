"""The gateway app: `create_app(GatewayConfig)` wires the routes, errors, limits and keys.

Routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings (a key on each unless
public), Triton's /v2 inference routes relayed with the deployment held (gateway/v2_relay.py),
GET /auth for nginx's auth_request in front of Triton's /v2 HTTP and gRPC APIs, and an open
GET /health for the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from builder.serve.gateway import chat, completions, embeddings, models, v2_relay
from builder.serve.gateway.auth import KeyGuard
from builder.serve.gateway.config import GatewayConfig
from builder.serve.gateway.deployments import Catalog
from builder.serve.gateway.errors import ApiError, install_handlers
from builder.serve.gateway.grpc_front import GrpcFront
from builder.serve.gateway.lifecycle import LOADED, Lifecycle, Tracked
from builder.serve.gateway.limits import BodyLimit
from builder.serve.gateway.memory import stub_rss_bytes
from builder.serve.gateway.metrics import CountRequests, GatewayMetrics
from builder.serve.gateway.state import Gateway
from builder.serve.gateway.stubs import dead_stubs
from builder.serve.gateway.tokens import TokenCounters
from builder.serve.gateway.triton_client import TritonClient
from builder.serve.gateway.waking import WakingTriton

log = logging.getLogger("serverless_triton.gateway")
_V2_MODEL = re.compile(r"^/v2/models/([^/?]+)(?:/versions/[^/?]+)?(/[^?]*)?(?:\?.*)?$")


def v2_model(uri: str) -> str | None:
    """The model a Triton /v2 request names, for every call that needs it loaded: inference, and
    metadata and config, which clients read first (tritonclient does). Not its readiness, which
    must say the truth to a load balancer, nor server-wide routes (health, stats, repository)."""
    match = _V2_MODEL.match(uri)
    if not match or match.group(2) == "/ready" or match.group(1) == "stats":
        return None
    return urllib.parse.unquote(match.group(1))


def status_of(d: Tracked) -> dict:
    return {"model": d.id, "state": d.state, "last_request": d.last_request or None, "in_flight": d.in_flight,
            "idle_timeout": d.idle_timeout, "cold_starts": d.cold_starts, "last_cold_start_s": d.last_cold_start_s,
            "load_seconds": d.load_seconds,
            "memory_bytes": d.memory_bytes or None, "failure": d.failure or None,
            "max_in_flight": d.max_in_flight or None, "overloaded": d.overloaded, "stub_restarts": d.stub_restarts}
USAGE_FLUSH_SECONDS = 5.0


async def _flush_forever(guard: KeyGuard) -> None:
    while True:
        await asyncio.sleep(USAGE_FLUSH_SECONDS)
        await asyncio.to_thread(guard.flush_usage)


def build_gateway(config: GatewayConfig, transport: httpx.AsyncBaseTransport | None = None) -> Gateway:
    if not config.public and config.state_dir is None:
        raise ValueError("keys are required (public=False) but no state_dir holds api-keys.json")
    guard = None if config.public else KeyGuard(config.state_dir)  # type: ignore[arg-type]
    client = TritonClient(config.triton_base_url, config.request_timeout, config.max_connections, transport)
    catalog = Catalog(config.repository)
    lifecycle = Lifecycle(client, config.hold_limit, memory_budget=config.memory_budget,
                          measure=lambda d: stub_rss_bytes(config.repository, d.models),
                          dead_stubs=lambda models: dead_stubs(config.repository, models))
    triton = WakingTriton(client, lifecycle, catalog, config.idle_timeout, config.idle_timeouts,
                          config.max_queue, config.max_queues)
    metrics = GatewayMetrics(lambda: {d.id: d.state == LOADED for d in lifecycle.deployments.values()},
                             on=config.metrics)
    lifecycle.on_cold_start = metrics.cold_start
    return Gateway(config, catalog, triton, guard, TokenCounters(config.repository), metrics)


def create_app(config: GatewayConfig, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The ASGI app; `transport` replaces the network to Triton (tests)."""
    gw = build_gateway(config, transport)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        flusher = asyncio.create_task(_flush_forever(gw.guard)) if gw.guard else None
        gw.triton.refresh()
        with contextlib.suppress(Exception):    # Triton not reachable yet: learned at the first request
            await gw.lifecycle.sync()
        sweeper = asyncio.create_task(gw.lifecycle.run())   # idle unloads, dead stubs, a restarted Triton
        relay = GrpcFront(config.triton_grpc, gw.triton.hold, gw.lifecycle.unready) if config.grpc_port else None
        if relay:
            await relay.start(config.grpc_port)
        try:
            yield
        finally:
            if relay:
                await relay.stop()
            for task in (flusher, sweeper):
                if task:
                    task.cancel()
            if flusher:
                gw.guard.flush_usage()  # type: ignore[union-attr]
            await gw.triton.aclose()

    app = FastAPI(title="serverless-triton OpenAI API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gateway = gw
    install_handlers(app)
    for module in (models, chat, completions, embeddings, v2_relay):
        app.include_router(module.router)

    @app.get("/auth", include_in_schema=False)
    async def auth(request: Request, via: str | None = None) -> Response:
        """204 for a valid key, 401 without one, 429 when rate-limited. With ?via=nginx every
        refusal is a 401 whose X-Auth-Error header says which (invalid_api_key or
        rate_limit_exceeded): nginx's auth_request turns any status but 2xx/401/403 into a 500, and
        its 403 already means "address not allowed"; nginx answers in the caller's protocol."""
        try:
            if gw.guard is not None:
                gw.guard.check(request.headers.get("authorization"))
            model = v2_model(request.headers.get("x-original-uri", ""))
            if model:
                await gw.triton.wake_model(model)     # scale to zero: a /v2 request wakes its deployment
        except ApiError as e:
            if via == "nginx":
                return Response(status_code=401, headers={**e.headers, "X-Auth-Error": e.code or "invalid_api_key"})
            return e.response()
        return Response(status_code=204)

    @app.get("/admin/deployments", include_in_schema=False)
    async def deployments_status() -> JSONResponse:
        """What `serverless-triton status` shows (loopback only: nginx never routes /admin here)."""
        gw.triton.refresh()
        return JSONResponse({"deployments": [status_of(d) for d in gw.lifecycle.deployments.values()]})

    @app.post("/admin/deployments/{deployment_id}/{action}", include_in_schema=False)
    async def deployment_action(deployment_id: str, action: str) -> JSONResponse:
        gw.triton.refresh()
        dep = gw.catalog.resolve(deployment_id)
        if action == "wake":
            await gw.triton.wake_model(dep.infer)
        elif action == "unload":
            if not await gw.lifecycle.unload(dep.id):
                raise ApiError(409, f"{dep.id} has requests in flight or is loading: try again when it is idle",
                               code="busy")
        else:
            raise ApiError(404, f"unknown action {action!r}: wake or unload", code="not_found")
        return JSONResponse(status_of(gw.lifecycle.deployments[dep.id]))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """The gateway's series (loopback only: serve's metrics endpoint merges them with Triton's)."""
        return Response(gw.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/ready", include_in_schema=False)
    async def ready() -> Response:
        """nginx's readiness check beside Triton's own (loopback only): 503 naming the deployments
        whose stub died and is not reloaded yet."""
        unready = gw.lifecycle.unready()
        if unready:
            return JSONResponse({"ready": False, "reloading": unready}, status_code=503)
        return Response(status_code=204)

    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "deployments": len(gw.catalog.all())})

    app.add_middleware(BodyLimit, limit=config.max_body_bytes, exempt="/v2/")   # tensors: Triton's business
    app.add_middleware(CountRequests, metrics=gw.metrics)     # outermost: counts the body limit's 413s too
    return app
