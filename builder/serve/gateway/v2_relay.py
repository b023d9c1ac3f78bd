"""Triton's /v2 inference calls (infer, generate) relayed through the gateway.

nginx sends these calls here instead of straight to Triton so that they count against their
deployment exactly like /v1 and gRPC calls: woken if unloaded, held in flight (an idle unload never
cuts them), refused at once past the deployment's queue bound (429 with Retry-After), and failed
within a second if a stub serving them dies. Bodies and answers pass through as bytes (JSON or
Triton's binary tensor extension); errors keep Triton's own shape, `{"error": "..."}`, because /v2
clients (tritonclient, KServe clients) read that. Key checks stay nginx's auth_request, as for the
rest of /v2.

Not generate_stream: relayed, a client's hang-up reached the engine in only about half of the
tries (measured; the same hang-up through nginx straight to Triton, or through /v1, stops the
engine every time), so streams stay on nginx's direct path until that is understood (issue 20).
"""

from __future__ import annotations

import contextlib

import anyio
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from builder.serve.gateway.errors import ApiError
from builder.serve.gateway.lifecycle import EngineDied, NotServable, Overloaded, Tracked
from builder.serve.gateway.state import gateway
from builder.serve.gateway.triton_client import close_response
from builder.serve.gateway.waking import unless_broken

router = APIRouter()
ACTIONS = ("infer", "generate")
# What Triton reads of a request and a client reads of an answer; nothing else crosses (no hop
# headers, no Authorization: the key stays with nginx and the gateway). Answers cross uncompressed
# (httpx would decode them anyway); a compressed request body passes as it is.
_REQUEST_HEADERS = ("content-type", "content-length", "content-encoding", "inference-header-content-length")
_ANSWER_HEADERS = ("content-type", "inference-header-content-length")


def refusal(status: int, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def refusal_for(e: Exception) -> JSONResponse:
    if isinstance(e, Overloaded):
        return refusal(429, str(e), e.retry_after)
    if isinstance(e, NotServable):
        return refusal(503, str(e), e.retry_after)
    assert isinstance(e, ApiError)
    return refusal(e.status, e.message, float(e.headers["Retry-After"]) if "Retry-After" in e.headers else None)


def _picked(headers: httpx.Headers | dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {name: headers[name] for name in names if name in headers}


async def _guarded(call, d: Tracked | None):
    return await (unless_broken(call, d) if d is not None else call)


@router.post("/v2/models/{model}/{action}", include_in_schema=False)
@router.post("/v2/models/{model}/versions/{version}/{action}", include_in_schema=False)
async def relay(request: Request, model: str, action: str, version: str | None = None) -> Response:
    if action not in ACTIONS:
        return refusal(404, f"the gateway relays only {', '.join(ACTIONS)} for /v2 models, not {action!r}")
    gw = gateway(request)
    held = contextlib.AsyncExitStack()
    d: Tracked | None = None
    try:
        hold = gw.triton.hold(model)         # None: no deployment owns it, Triton answers for itself
        if hold is not None:
            d = await held.enter_async_context(hold)
            request.state.deployment = d.id
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = _picked(request.headers, _REQUEST_HEADERS)
        upstream = await _guarded(gw.triton.client.send_raw(path, headers, await request.body(), model), d)
    except (NotServable, ApiError) as e:
        await held.aclose()
        return refusal_for(e)
    except BaseException:
        await held.aclose()
        raise
    try:
        body = await _guarded(upstream.aread(), d)
    except (EngineDied, httpx.TransportError) as e:
        return refusal(503, str(e) if isinstance(e, EngineDied) else
                       f"the connection to Triton broke before its answer ({type(e).__name__}); retry shortly", 5)
    finally:
        with anyio.CancelScope(shield=True):
            await close_response(upstream)
            await held.aclose()
    return Response(body, status_code=upstream.status_code, headers=_picked(upstream.headers, _ANSWER_HEADERS))
