"""Server-sent events as OpenAI streams them: `data: {json}` blocks, `data: [DONE]` at the end.

A failure after the first byte can no longer change the status code, so it becomes one error
event in OpenAI's shape (the openai client raises it), and the stream closes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

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


def streaming_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(guarded(events), media_type="text/event-stream", headers=HEADERS)
