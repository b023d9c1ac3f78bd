"""Request-body size limit, as plain ASGI middleware in front of everything.

The body is read (up to the limit) before the app runs, so a client that streams an endless
chunked body gets a 413 after `limit` bytes instead of filling memory; a Content-Length over the
limit is refused without reading anything.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _too_large(limit: int) -> tuple[dict[str, Any], bytes]:
    body = json.dumps({"error": {"message": f"the request body is larger than this server's limit of {limit} bytes",
                                 "type": "invalid_request_error", "param": None, "code": "request_too_large"}})
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, body.encode()


class BodyLimit:
    """`exempt`: a path prefix whose bodies stream through unread and unlimited (the /v2 relay)."""

    def __init__(self, app: ASGIApp, limit: int, exempt: str | None = None):
        self.app, self.limit, self.exempt = app, limit, exempt

    async def _refuse(self, send: Send) -> None:
        start, body = _too_large(self.limit)
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.exempt and scope.get("path", "").startswith(self.exempt)):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)
