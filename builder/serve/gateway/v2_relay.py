"""Triton's /v2 inference calls (infer, generate) relayed through the gateway.

nginx sends these calls here instead of straight to Triton so that they count against their
deployment exactly like /v1 and gRPC calls: woken if unloaded, held in flight (an idle unload never
cuts them), refused at once past the deployment's queue bound (429 with Retry-After), and failed
within a second if a stub serving them dies. Bodies and answers pass through as bytes (JSON or
Triton's binary tensor extension); errors keep Triton's own shape, `{"error": "..."}`, because /v2
clients (tritonclient, KServe clients) read that. Key checks stay nginx's auth_request, as for the
rest of /v2.

generate_stream passes chunk by chunk. A client that hangs up closes Triton's connection at once
(shielded, `close_response`: Starlette cancels the response task, and an unshielded close would be
cancelled with it), which is how Triton cancels the request and the engine stops generating for it.
A stub that dies mid-stream ends the stream with one error event in Triton's shape,
`data: {"error": "..."}`, as Triton ends a stream that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from functools import partial

import anyio
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from builder.serve.gateway.errors import ApiError
from builder.serve.gateway.lifecycle import EngineDied, NotServable, Overloaded, Tracked
from builder.serve.gateway.sse import ClosingStream
from builder.serve.gateway.state import gateway
from builder.serve.gateway.triton_client import close_response, message_of, stub_died
from builder.serve.gateway.waking import unless_broken

router = APIRouter()
ACTIONS = ("infer", "generate", "generate_stream")
# What Triton reads of a request and a client reads of an answer; nothing else crosses (no hop
# headers, no Authorization: the key stays with nginx and the gateway). Answers cross uncompressed
# (httpx would decode them anyway); a compressed request body passes as it is.
_REQUEST_HEADERS = ("content-type", "content-length", "content-encoding", "inference-header-content-length")
_ANSWER_HEADERS = ("content-type", "inference-header-content-length")
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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


async def _guarded(call, d: Tracked | None, broken: asyncio.Event | None):
    return await (unless_broken(call, d, broken) if d is not None else call)


@router.post("/v2/models/{model}/{action}", include_in_schema=False)
@router.post("/v2/models/{model}/versions/{version}/{action}", include_in_schema=False)
async def relay(request: Request, model: str, action: str, version: str | None = None) -> Response:
    if action not in ACTIONS:
        return refusal(404, f"the gateway relays only {', '.join(ACTIONS)} for /v2 models, not {action!r}")
    gw = gateway(request)
    held = contextlib.AsyncExitStack()
    d: Tracked | None = None
    broken: asyncio.Event | None = None     # taken once: the send and the read are one request
    try:
        hold = gw.triton.hold(model)         # None: no deployment owns it, Triton answers for itself
        if hold is not None:
            d = await held.enter_async_context(hold)
            broken = d.broken
            request.state.deployment = d.id
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = _picked(request.headers, _REQUEST_HEADERS)
        upstream = await _guarded(gw.triton.client.send_raw(path, headers, await request.body(), model), d, broken)
    except (NotServable, ApiError) as e:
        await held.aclose()
        return refusal_for(e)
    except BaseException:
        await held.aclose()
        raise
    if action == "generate_stream" and upstream.status_code == 200:
        headers = {**_picked(upstream.headers, _ANSWER_HEADERS), **_STREAM_HEADERS}
        return ClosingStream(_streamed(upstream, d, broken), partial(_close, upstream, held), headers=headers)
    try:
        body = await _guarded(upstream.aread(), d, broken)
    except (EngineDied, httpx.TransportError) as e:
        return refusal(503, str(e) if isinstance(e, EngineDied) else
                       f"the connection to Triton broke before its answer ({type(e).__name__}); retry shortly", 5)
    finally:
        with anyio.CancelScope(shield=True):
            await _close(upstream, held)
    message = message_of(body) if upstream.status_code != 200 else ""
    if stub_died(message):           # Triton says 400: it is no client mistake
        return refusal(503, f"{message} (the gateway is reloading it: retry in a few seconds)", 5)
    return Response(body, status_code=upstream.status_code, headers=_picked(upstream.headers, _ANSWER_HEADERS))


def _error_event(message: str) -> bytes:
    return b"data: " + json.dumps({"error": message}).encode() + b"\n\n"


async def _close(upstream: httpx.Response, held: contextlib.AsyncExitStack) -> None:
    await close_response(upstream)     # Triton cancels the request: the engine stops generating
    await held.aclose()


async def _streamed(upstream: httpx.Response, d: Tracked | None, broken: asyncio.Event | None) -> AsyncIterator[bytes]:
    """Triton's stream as it comes (the response closes it, however it ends: ClosingStream)."""
    chunks = upstream.aiter_bytes()     # decoded, as aread() is for the rest
    while True:
        try:
            chunk = await _guarded(anext(chunks, None), d, broken)
        except EngineDied as e:
            yield _error_event(str(e))
            return
        except (httpx.HTTPError, httpx.StreamError) as e:
            yield _error_event(f"Triton's stream broke ({type(e).__name__}); retry shortly")
            return
        if chunk is None:
            return
        yield chunk
