"""Triton's HTTP API, async, through one shared connection pool.

No lock around calls: concurrent requests reach Triton together, so its in-flight batching still
batches them. Streams are read event by event (never buffered) and closing one closes the
connection, which Triton's streaming model sees as a departed client and stops generating.
Triton's answers are turned into `ApiError`s here, so the routers only see OpenAI-shaped errors.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import numpy as np

from builder.serve.gateway.errors import ApiError, bad_request, unavailable

_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")
_NOT_LOADED = ("request for unknown model", "model is not ready")
_INTERNAL = ("internal error", "failed to process the request")
_DEAD_STUB = re.compile(r"Stub process '[^']*' is not healthy")
_HEADER_LENGTH = "inference-header-content-length"
CONFIG_TTL = 30.0
CLOSE_TIMEOUT = 2.0


def triton_error(status: int, message: str, model: str) -> ApiError:
    """A Triton error answer as the gateway's: 400s pass through (without the ensemble prefix),
    a model that is not loaded or a busy server is a 503 the client may retry, a crash in a
    model a 502."""
    message = _ENSEMBLE_PREFIX.sub("", message.strip()) or f"Triton answered {status}"
    lowered = message.lower()
    if status in (404, 503) or lowered.startswith(_NOT_LOADED):
        return unavailable(f"{model} is not available right now ({message}); retry shortly", 2)
    if stub_died(message):   # a Python stub died: the gateway's watch reloads it (gateway/stubs.py)
        return unavailable(f"a process serving {model} died and is being reloaded ({message}); retry in a few "
                           "seconds", 5)
    if status >= 500:
        return unavailable(f"Triton could not serve the request ({message}); retry shortly")
    if lowered.startswith(_INTERNAL):
        return ApiError(502, message, type="server_error", code="bad_gateway")
    code = "context_length_exceeded" if "context size" in lowered else "invalid_value"
    return bad_request(message, code=code)


def stub_died(message: str) -> bool:
    """Whether Triton's error says a Python stub died (a server fault the client may retry)."""
    return bool(_DEAD_STUB.search(message))


def message_of(raw: bytes) -> str:
    """The text of a Triton error answer (its `error` field, else the raw text); a refused
    generate_stream answers in one SSE event, `data: {"error": ...}`."""
    raw = raw.strip().removeprefix(b"data:")
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:500]
    return str(data.get("error", data)) if isinstance(data, dict) else str(data)


class TritonStream:
    """An open /generate_stream answer: `next()` gives one event (a dict) or None at the end."""

    def __init__(self, response: httpx.Response, model: str):
        self._response, self._model = response, model
        self._lines: AsyncIterator[str] = response.aiter_lines()

    async def next(self) -> dict[str, Any] | None:
        try:
            async for line in self._lines:
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:].strip())
                if "error" in event:
                    raise triton_error(400, str(event["error"]), self._model)
                return event
        except httpx.TransportError as e:
            raise unavailable(f"the connection to Triton broke mid-stream ({type(e).__name__})") from None
        return None

    async def aclose(self) -> None:
        """Close the connection (Triton's streaming model sees a departed client and stops)."""
        await close_response(self._response)


async def close_response(response: httpx.Response) -> None:
    """Close a streamed answer's connection, which is how Triton learns that the client left.
    Shielded: it runs while the request's task is being cancelled (the client hung up, Starlette
    cancels the response), and an unshielded close is cancelled at its first await, leaving the
    connection open and the engine generating for nobody. Bounded: after a read cancelled because
    the stub behind it died, closing can wait forever, and the client would never get its error."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
        await response.aclose()


class TritonClient:
    """One pool of keep-alive connections to Triton, shared by every request of the gateway."""

    def __init__(self, base_url: str, timeout: float, max_connections: int = 512,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=base_url, limits=limits, transport=transport,
                                       timeout=httpx.Timeout(timeout, connect=5.0))
        self._configs: dict[str, tuple[float, dict[str, Any]]] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: httpx.Request, model: str, stream: bool = False,
                    late: str | None = None) -> httpx.Response:
        """Send one request to Triton; a timeout is a 504 (`late` says what was late), a broken or
        refused connection a retryable 503."""
        try:
            return await self._http.send(request, stream=stream)
        except httpx.TimeoutException:
            raise ApiError(504, late or f"Triton did not answer within the gateway's timeout for {model}",
                           type="server_error", code="timeout") from None
        except httpx.TransportError as e:
            raise unavailable(f"Triton is not reachable at {self.base_url} ({type(e).__name__}); retry shortly") from None

    async def _post(self, path: str, model: str, **kwargs: Any) -> httpx.Response:
        response = await self._send(self._http.build_request("POST", path, **kwargs), model)
        if response.status_code != 200:
            raise triton_error(response.status_code, message_of(response.content), model)
        return response

    async def generate(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """One complete generation (the non-decoupled ensemble)."""
        response = await self._post(f"/v2/models/{model}/generate", model, json=body)
        return response.json()

    async def open_stream(self, model: str, body: dict[str, Any]) -> TritonStream:
        """Start a streamed generation; the caller must `aclose()` the stream."""
        request = self._http.build_request("POST", f"/v2/models/{model}/generate_stream", json=body)
        response = await self._send(request, model, stream=True, late=f"Triton did not start streaming {model} in time")
        if response.status_code != 200:
            raw = await response.aread()
            await response.aclose()
            raise triton_error(response.status_code, message_of(raw), model)
        return TritonStream(response, model)

    async def send_raw(self, path: str, headers: dict[str, str], content: bytes, model: str) -> httpx.Response:
        """POST a client's own /v2 request and return Triton's answer unread, whatever its status:
        the /v2 relay passes both through as they are."""
        return await self._send(self._http.build_request("POST", path, headers=headers, content=content), model,
                                stream=True)

    async def config(self, model: str) -> dict[str, Any]:
        """The model's configuration, cached for CONFIG_TTL seconds (it changes only on a reload)."""
        cached = self._configs.get(model)
        if cached and time.monotonic() - cached[0] < CONFIG_TTL:
            return cached[1]
        try:
            response = await self._http.get(f"/v2/models/{model}/config")
        except httpx.TransportError as e:
            raise unavailable(f"Triton is not reachable at {self.base_url} ({type(e).__name__})") from None
        if response.status_code != 200:
            raise triton_error(response.status_code, message_of(response.content), model)
        self._configs[model] = (time.monotonic(), response.json())
        return self._configs[model][1]

    # -- the model repository (scale to zero: builder/serve/gateway/lifecycle.py) ----------------
    async def _repository(self, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        try:
            response = await self._http.post(f"/v2/repository{path}", json=body or {},
                                             timeout=timeout or self._http.timeout)
        except httpx.TransportError as e:
            raise unavailable(f"Triton is not reachable at {self.base_url} ({type(e).__name__})") from None
        if response.status_code != 200:
            raise RuntimeError(message_of(response.content))
        return response.json() if response.content else None

    async def load(self, model: str) -> None:
        """Load (or reload) one model; returns once Triton says it is ready, else raises with why."""
        await self._repository(f"/models/{model}/load", timeout=600.0)
        self._configs.pop(model, None)

    async def unload(self, model: str, timeout: float = 60.0) -> None:
        """Unload one model (not its dependents) and wait until Triton has let it go: the unload
        call returns before the model's instances are gone."""
        await self._repository(f"/models/{model}/unload", {"parameters": {"unload_dependents": False}})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {m["name"]: m.get("state") for m in await self._repository("/index")}
            if states.get(model) != "UNLOADING":
                return
            await asyncio.sleep(0.05)

    async def reload(self, model: str, unload_wait: float = 5.0) -> None:
        """Start a model again whose stub died: unload, then load. The unload of a dead stub's model
        can stay UNLOADING while requests it never answered are counted in flight; the load does
        not need it gone (measured on 2.51), so the wait is short."""
        await self.unload(model, timeout=unload_wait)
        await self.load(model)

    async def ready_models(self) -> set[str]:
        return {m["name"] for m in await self._repository("/index", {"ready": True})}

    async def last_inference(self) -> dict[str, float]:
        """Each model's last inference as Triton counted it (any protocol), in unix seconds."""
        try:
            response = await self._http.get("/v2/models/stats")
        except httpx.TransportError as e:
            raise unavailable(f"Triton is not reachable at {self.base_url} ({type(e).__name__})") from None
        stats = response.json().get("model_stats", []) if response.status_code == 200 else []
        return {s["name"]: int(s.get("last_inference", 0)) / 1000.0 for s in stats}

    async def embed(self, model: str, texts: list[str]) -> np.ndarray:
        """FP32 [n, dim] for n texts in one request (binary output: no float printing and parsing)."""
        body = {"inputs": [{"name": "text", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}],
                "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}]}
        response = await self._post(f"/v2/models/{model}/infer", model, json=body)
        return decode_infer(response.content, response.headers.get(_HEADER_LENGTH), "embedding")


def decode_infer(raw: bytes, header_length: str | None, name: str) -> np.ndarray:
    """One FP32 output of a KServe v2 answer, JSON or with Triton's binary extension."""
    size = int(header_length) if header_length else len(raw)
    header = json.loads(raw[:size])
    offset = size
    for out in header["outputs"]:
        length = out.get("parameters", {}).get("binary_data_size")
        if out["name"] == name:
            if length is None:
                return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
            return np.frombuffer(raw[offset:offset + length], dtype="<f4").reshape(out["shape"])
        offset += length or 0
    raise ApiError(502, f"Triton's answer has no {name!r} output", type="server_error", code="bad_gateway")
