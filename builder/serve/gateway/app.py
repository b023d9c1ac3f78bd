"""The gateway app: `create_app(GatewayConfig)` wires the routes, errors, limits and keys.

Routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings (a key on each unless
public), GET /auth for nginx's auth_request in front of Triton's /v2 HTTP and gRPC APIs, and an
open GET /health for the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from builder.serve.gateway import chat, completions, embeddings, models
from builder.serve.gateway.auth import KeyGuard
from builder.serve.gateway.config import GatewayConfig
from builder.serve.gateway.deployments import Catalog
from builder.serve.gateway.errors import ApiError, install_handlers
from builder.serve.gateway.limits import BodyLimit
from builder.serve.gateway.state import Gateway
from builder.serve.gateway.tokens import TokenCounters
from builder.serve.gateway.triton_client import TritonClient

log = logging.getLogger("serverless_triton.gateway")
USAGE_FLUSH_SECONDS = 5.0


async def _flush_forever(guard: KeyGuard) -> None:
    while True:
        await asyncio.sleep(USAGE_FLUSH_SECONDS)
        await asyncio.to_thread(guard.flush_usage)


def build_gateway(config: GatewayConfig, transport: httpx.AsyncBaseTransport | None = None) -> Gateway:
    if not config.public and config.state_dir is None:
        raise ValueError("keys are required (public=False) but no state_dir holds api-keys.json")
    guard = None if config.public else KeyGuard(config.state_dir)  # type: ignore[arg-type]
    triton = TritonClient(config.triton_base_url, config.request_timeout, config.max_connections, transport)
    return Gateway(config, Catalog(config.repository), triton, guard, TokenCounters(config.repository))


def create_app(config: GatewayConfig, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The ASGI app; `transport` replaces the network to Triton (tests)."""
    gw = build_gateway(config, transport)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        flusher = asyncio.create_task(_flush_forever(gw.guard)) if gw.guard else None
        try:
            yield
        finally:
            if flusher:
                flusher.cancel()
                gw.guard.flush_usage()  # type: ignore[union-attr]
            await gw.triton.aclose()

    app = FastAPI(title="serverless-triton OpenAI API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gateway = gw
    install_handlers(app)
    for module in (models, chat, completions, embeddings):
        app.include_router(module.router)

    @app.get("/auth", include_in_schema=False)
    async def auth(request: Request, via: str | None = None) -> Response:
        """204 for a valid key, 401 without one, 429 when rate-limited. With ?via=nginx every
        refusal is a 401 whose X-Auth-Error header says which (invalid_api_key or
        rate_limit_exceeded): nginx's auth_request turns any status but 2xx/401/403 into a 500, and
        its 403 already means "address not allowed"; nginx answers in the caller's protocol."""
        if gw.guard is None:
            return Response(status_code=204)
        try:
            gw.guard.check(request.headers.get("authorization"))
        except ApiError as e:
            if via == "nginx":
                return Response(status_code=401, headers={**e.headers, "X-Auth-Error": e.code or "invalid_api_key"})
            return e.response()
        return Response(status_code=204)

    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "deployments": len(gw.catalog.all())})

    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    return app
