"""The Triton the routers talk to, with scale to zero in front: every call for a deployment wakes
it first (builder/serve/gateway/lifecycle.py) and counts as in flight until it ends (for a stream,
until the stream is closed), so an idle unload never cuts it. Same methods as TritonClient."""

from __future__ import annotations

import math
from contextlib import AbstractAsyncContextManager
from typing import Any

import numpy as np

from builder.serve.gateway.deployments import Catalog, Deployment
from builder.serve.gateway.errors import ApiError, unavailable
from builder.serve.gateway.lifecycle import Lifecycle, NotServable, Tracked
from builder.serve.gateway.triton_client import TritonClient, TritonStream


def tracked(deployments: list[Deployment], idle_timeout: float, idle_timeouts: dict[str, float]) -> list[Tracked]:
    """What the lifecycle manages: each deployment with its idle timeout (its name's own, else the
    serve-wide one)."""
    return [Tracked(d.id, d.models, idle_timeouts.get(d.name, idle_timeouts.get(d.id, idle_timeout)),
                    memory_bytes=d.memory_bytes) for d in deployments if d.models]


def not_servable(e: NotServable) -> ApiError:
    return unavailable(str(e), max(1, math.ceil(e.retry_after)))


class _Held:
    """A stream that keeps its deployment in flight until it is closed."""

    def __init__(self, stream: TritonStream, serving: AbstractAsyncContextManager):
        self._stream, self._serving = stream, serving

    async def next(self) -> dict[str, Any] | None:
        return await self._stream.next()

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            await self._serving.__aexit__(None, None, None)


class WakingTriton:
    def __init__(self, client: TritonClient, lifecycle: Lifecycle, catalog: Catalog,
                 idle_timeout: float = 0.0, idle_timeouts: dict[str, float] | None = None):
        self.client, self.lifecycle, self.catalog = client, lifecycle, catalog
        self.idle_timeout, self.idle_timeouts = idle_timeout, dict(idle_timeouts or {})
        self._stamp: tuple[str, ...] = ()

    def refresh(self) -> None:
        """Follow the manifest (a pull may add or remove deployments)."""
        deployments = self.catalog.all()
        stamp = tuple((d.id, *d.models) for d in deployments)
        if stamp != self._stamp:
            self.lifecycle.track(tracked(deployments, self.idle_timeout, self.idle_timeouts))
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
            async with self._serving(model):
                return await self.client.generate(model, body)
        except NotServable as e:
            raise not_servable(e) from None

    async def embed(self, model: str, texts: list[str]) -> np.ndarray:
        try:
            async with self._serving(model):
                return await self.client.embed(model, texts)
        except NotServable as e:
            raise not_servable(e) from None

    async def open_stream(self, model: str, body: dict[str, Any]) -> _Held:
        serving = self._serving(model)
        try:
            await serving.__aenter__()
        except NotServable as e:
            await serving.__aexit__(None, None, None)
            raise not_servable(e) from None
        try:
            return _Held(await self.client.open_stream(model, body), serving)
        except BaseException:
            await serving.__aexit__(None, None, None)
            raise

    async def config(self, model: str) -> dict[str, Any]:
        await self.wake_model(model)
        return await self.client.config(model)

    async def input_names(self, model: str) -> set[str]:
        return {i["name"] for i in (await self.config(model)).get("input", [])}

    async def wake_model(self, model: str) -> Deployment | None:
        """Load the deployment a Triton entry point belongs to (a /v2 request through nginx's
        auth_request), and count the request as activity; None if no deployment owns it."""
        self.refresh()
        dep = self.catalog.owner(model)
        if dep is None or dep.id not in self.lifecycle.deployments:
            return None
        try:
            async with self.lifecycle.serving(dep.id):
                return dep
        except NotServable as e:
            raise not_servable(e) from None

    async def aclose(self) -> None:
        await self.client.aclose()
