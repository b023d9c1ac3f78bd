"""The Triton the routers talk to, with scale to zero in front: every call for a deployment wakes
it first (builder/serve/gateway/lifecycle.py) and counts as in flight until it ends (for a stream,
until the stream is closed), so an idle unload never cuts it. Same methods as TritonClient."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import numpy as np

from backends.contract.faults import died_mid_request
from builder.serve.gateway.backpressure import in_flight_bound, queue_for
from builder.serve.gateway.deployments import Catalog, Deployment
from builder.serve.gateway.errors import ApiError, unavailable
from builder.serve.gateway.lifecycle import EngineDied, Lifecycle, NotServable, Overloaded, Tracked
from builder.serve.gateway.triton_client import TritonClient, TritonStream

T = TypeVar("T")
CANCEL_WAIT = 2.0      # seconds a cancelled call may take to wind down


def tracked(deployments: list[Deployment], idle_timeout: float, idle_timeouts: dict[str, float],
            max_queue: int | None = None, max_queues: dict[str, int] | None = None) -> list[Tracked]:
    """What the lifecycle manages: each deployment with its idle timeout (its name's own, else the
    serve-wide one) and its in-flight bound (gateway/backpressure.py)."""
    return [Tracked(d.id, d.models, idle_timeouts.get(d.name, idle_timeouts.get(d.id, idle_timeout)),
                    build_bytes=d.memory_bytes,
                    max_in_flight=in_flight_bound(d.max_batch_size, queue_for(d.name, d.id, max_queue, max_queues or {})))
            for d in deployments if d.models]


def not_servable(e: NotServable) -> ApiError:
    retry = str(max(1, math.ceil(e.retry_after)))
    if isinstance(e, Overloaded):
        return ApiError(429, str(e), type="server_error", code="queue_full", headers={"Retry-After": retry})
    return unavailable(str(e), int(retry))


async def unless_broken(call: Awaitable[T], d: Tracked, broken: asyncio.Event | None = None) -> T:
    """`call`'s result, unless a stub of `d` dies first: then EngineDied, and the call is cancelled
    (a request inside a dead stub may never be answered by Triton).

    `broken`: the event `d.broken` was when the request began, for a request made of several
    awaits (a stream's reads). A heal replaces `d.broken` once it has set it, so a read that took
    the event afresh after a death it missed (the stream was between two reads) would wait on the
    new one and never hear of it: the stream stayed silent until the client's timeout."""
    broken = d.broken if broken is None else broken
    task = asyncio.ensure_future(call)
    waiter = asyncio.ensure_future(broken.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()      # first: under an anyio cancel scope (a client hung up), every await
        if not task.done():  # below is cancelled again, and the waiter would stay on the event
            task.cancel()
            # bounded: a read cancelled because its stub died can hang in the connection's close
            # (seen in CI: two streams silent until the client's timeout), and the client would
            # never get its error
            await asyncio.wait({task}, timeout=CANCEL_WAIT)
    if not task.done() or task.cancelled():
        raise EngineDied(died_mid_request(f"a process serving {d.id}"), 5.0)
    return task.result()


class _Held:
    """A stream that keeps its deployment in flight until it is closed."""

    def __init__(self, stream: TritonStream, serving: AbstractAsyncContextManager, d: Tracked,
                 broken: asyncio.Event):
        self._stream, self._serving, self._d, self._broken = stream, serving, d, broken
        self._closed = False

    async def next(self) -> dict[str, Any] | None:
        try:
            return await unless_broken(self._stream.next(), self._d, self._broken)
        except NotServable as e:
            raise not_servable(e) from None

    async def aclose(self) -> None:
        """Close the stream and end its hold; again is harmless (the response closes it too)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._stream.aclose()
        finally:
            await self._serving.__aexit__(None, None, None)


class WakingTriton:
    def __init__(self, client: TritonClient, lifecycle: Lifecycle, catalog: Catalog,
                 idle_timeout: float = 0.0, idle_timeouts: dict[str, float] | None = None,
                 max_queue: int | None = None, max_queues: dict[str, int] | None = None):
        self.client, self.lifecycle, self.catalog = client, lifecycle, catalog
        self.idle_timeout, self.idle_timeouts = idle_timeout, dict(idle_timeouts or {})
        self.max_queue, self.max_queues = max_queue, dict(max_queues or {})
        self._stamp: tuple[str, ...] = ()

    def refresh(self) -> None:
        """Follow the manifest (a pull may add or remove deployments)."""
        deployments = self.catalog.all()
        stamp = tuple((d.id, d.memory_bytes, *d.models) for d in deployments)   # a rebuild changes the figure
        if stamp != self._stamp:
            self.lifecycle.track(tracked(deployments, self.idle_timeout, self.idle_timeouts, self.max_queue,
                                         self.max_queues))
            self.lifecycle.ensembles = {d.infer for d in deployments}   # the entry point clients call
            self._stamp = stamp

    def _serving(self, model: str) -> AbstractAsyncContextManager:
        self.refresh()
        dep = self.catalog.owner(model)
        if dep is None or dep.id not in self.lifecycle.deployments:
            raise ApiError(404, f"no deployment serves the Triton model {model!r}", code="model_not_found")
        return self.lifecycle.serving(dep.id)

    async def generate(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self._serving(model) as d:
                return await unless_broken(self.client.generate(model, body), d)
        except NotServable as e:
            raise not_servable(e) from None

    async def embed(self, model: str, texts: list[str]) -> np.ndarray:
        try:
            async with self._serving(model) as d:
                return await unless_broken(self.client.embed(model, texts), d)
        except NotServable as e:
            raise not_servable(e) from None

    async def open_stream(self, model: str, body: dict[str, Any]) -> _Held:
        serving = self._serving(model)
        try:
            d = await serving.__aenter__()
        except NotServable as e:
            await serving.__aexit__(None, None, None)
            raise not_servable(e) from None
        broken = d.broken      # the stream's whole life answers to the stubs it started with
        try:
            return _Held(await unless_broken(self.client.open_stream(model, body), d, broken), serving, d, broken)
        except NotServable as e:
            await serving.__aexit__(None, None, None)
            raise not_servable(e) from None
        except BaseException:
            await serving.__aexit__(None, None, None)
            raise

    async def config(self, model: str) -> dict[str, Any]:
        await self.wake_model(model)
        return await self.client.config(model)

    async def input_names(self, model: str) -> set[str]:
        return {i["name"] for i in (await self.config(model)).get("input", [])}

    def hold(self, model: str) -> AbstractAsyncContextManager | None:
        """Held loaded (woken first) while the context is open, for a Triton model a gRPC call names;
        None if no deployment owns it (Triton answers the call itself)."""
        self.refresh()
        dep = self.catalog.owner(model)
        if dep is None or dep.id not in self.lifecycle.deployments:
            return None
        return self.lifecycle.serving(dep.id)

    async def wake_model(self, model: str) -> Deployment | None:
        """Load the deployment a Triton entry point belongs to (a /v2 request through nginx's
        auth_request), and count the request as activity; None if no deployment owns it."""
        self.refresh()
        dep = self.catalog.owner(model)
        if dep is None or dep.id not in self.lifecycle.deployments:
            return None
        try:
            async with self.lifecycle.serving(dep.id, bounded=False):   # only wakes: the /v2 call is Triton's
                return dep
        except NotServable as e:
            raise not_servable(e) from None

    async def aclose(self) -> None:
        await self.client.aclose()
