"""Server-sent events as OpenAI streams them: `data: {json}` blocks, `data: [DONE]` at the end.

A failure after the first byte can no longer change the status code, so it becomes one error
event in OpenAI's shape (the openai client raises it), and the stream closes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from builder.serve.gateway.errors import ApiError

log = logging.getLogger("serverless_triton.gateway")
DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def chunk_writer(obj: str, cid: str, created: int, model: str,
                 include_usage: bool) -> Callable[..., bytes]:
    """The events of one stream: `write(choices, usage_body=None)`. With include_usage every chunk
    carries `usage` (null until the final one, as OpenAI sends it)."""

    def write(choices: list[dict[str, Any]], usage_body: dict[str, int] | None = None) -> bytes:
        data: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": model,
                                "system_fingerprint": None, "choices": choices}
        if include_usage:
            data["usage"] = usage_body
        return event(data)

    return write


async def guarded(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Pass events through; an error mid-stream becomes one error event, then the stream ends."""
    try:
        async for chunk in events:
            yield chunk
    except ApiError as e:
        yield event(e.body())
    except Exception as e:  # noqa: BLE001 -- a stream must end with an error event, whatever failed
        log.error("stream failed: %s: %s", type(e).__name__, e)
        yield event(ApiError(500, "internal error in the gateway while streaming", type="server_error",
                             code="internal_error").body())


class ClosingStream(StreamingResponse):
    """A stream that runs `close` however the response ends: the body's own `finally` is not
    enough, since a client gone before the first chunk never starts the body (its Triton streams
    would stay open and its deployment in flight for good). Shielded: it runs while Starlette
    cancels the response of a client that hung up."""

    def __init__(self, content: AsyncIterator[bytes], close: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()


def streaming_response(events: AsyncIterator[bytes], close: Callable[[], Awaitable[None]]) -> StreamingResponse:
    return ClosingStream(guarded(events), close, media_type="text/event-stream", headers=HEADERS)
