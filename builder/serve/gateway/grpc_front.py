"""Scale to zero for gRPC: a relay in front of Triton's gRPC port that wakes the deployment a call
names before passing the call on, and keeps it in flight until the call ends.

nginx's `auth_request` cannot see a gRPC call's model (it is inside the protobuf body), so nginx
hands gRPC calls to this relay instead of Triton when scale to zero is on. Every method is relayed
as raw bytes (no re-encoding); only the first message of each call for ModelInfer, ModelStreamInfer,
ModelMetadata and ModelConfig is parsed, for its model name. A deployment that cannot be loaded
answers UNAVAILABLE with the reason (never a hang, never Triton's bare "unknown model"); readiness
(ModelReady, and the server-wide calls) passes through without waking anything, as /v2 .../ready does.
ServerReady is answered `ready: false` here while a deployment is being reloaded after its stub
died (Triton itself keeps saying READY), as nginx's /v2/health/ready is 503 then. A call inside a
stub that dies is cancelled upstream and answered UNAVAILABLE (Triton would never answer it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from backends.contract.faults import died_mid_request
from builder.serve.gateway.errors import ApiError
from builder.serve.gateway.lifecycle import NotServable, Overloaded, Tracked

log = logging.getLogger("serverless_triton.gateway.grpc")

SERVICE = "/inference.GRPCInferenceService/"
# method -> the request message whose field names the model
_NAMED: dict[str, tuple[type, str]] = {
    SERVICE + "ModelInfer": (service_pb2.ModelInferRequest, "model_name"),
    SERVICE + "ModelStreamInfer": (service_pb2.ModelInferRequest, "model_name"),
    SERVICE + "ModelMetadata": (service_pb2.ModelMetadataRequest, "name"),
    SERVICE + "ModelConfig": (service_pb2.ModelConfigRequest, "name"),
}
# gRPC's own and HTTP/2's headers are the channel's business, not the call's
_HOP_HEADERS = (":", "grpc-", "user-agent", "content-type", "te")
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# After Triton restarts (serve's supervision), the channel must find it again at once: gRPC's default
# reconnect back-off grows to minutes, during which every relayed call fails UNAVAILABLE.
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 500)]

SERVER_READY = SERVICE + "ServerReady"
STREAM_INFER = SERVICE + "ModelStreamInfer"
# deployment for a Triton model name -> async context that holds it loaded (WakingTriton.serving_model)
Holder = Callable[[str], AbstractAsyncContextManager | None]
# the deployments that cannot serve now although Triton says READY (Lifecycle.unready)
Unready = Callable[[], list[str]]


def model_named(method: str, message: bytes) -> str | None:
    """The model a call's request names, for the calls that need it loaded; None for the rest."""
    named = _NAMED.get(method)
    if named is None:
        return None
    kind, field = named
    request = kind()
    request.ParseFromString(message)
    return getattr(request, field) or None


def forwarded_metadata(metadata: Any) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((m.key, m.value) for m in metadata or () if not m.key.startswith(_HOP_HEADERS))


def _cancelling() -> bool:
    """Whether this task itself is being cancelled (the client left), not just a call it awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Held:
    """The deployments one call keeps in flight (a stream may name several models), and whether a
    stub of one of them died since the call began (`died`: why; `on_death` is then called once)."""

    def __init__(self, hold: Holder, on_death: Callable[[], None] = lambda: None):
        self._hold, self._stack, self._models = hold, contextlib.AsyncExitStack(), set[str]()
        self._watches: list[asyncio.Task] = []
        self.on_death, self.died = on_death, ""

    async def enter(self, model: str | None) -> None:
        if model is None or model in self._models:
            return
        self._models.add(model)
        ctx = self._hold(model)
        if ctx is not None:
            d = await self._stack.enter_async_context(ctx)
            if isinstance(d, Tracked):   # its event as the call found it: a heal sets it, then replaces it
                self._watches.append(asyncio.create_task(self._watch(d.id, d.broken)))

    async def _watch(self, deployment: str, broken: asyncio.Event) -> None:
        await broken.wait()
        if not self.died:
            self.died = died_mid_request(f"a process serving {deployment}", "call")
            self.on_death()

    async def aclose(self) -> None:
        for watch in self._watches:
            watch.cancel()
        await self._stack.aclose()


class GrpcFront:
    """`start(port)` serves on 127.0.0.1:port; `upstream` is Triton's gRPC host:port."""

    def __init__(self, upstream: str, hold: Holder, unready: Unready = list):
        self.upstream, self.hold, self.unready = upstream, hold, unready
        self.channel: grpc.aio.Channel | None = None
        self.server: grpc.aio.Server | None = None

    async def start(self, port: int, host: str = "127.0.0.1") -> None:
        self.channel = grpc.aio.insecure_channel(self.upstream, options=UNLIMITED + RECONNECT)
        self.server = grpc.aio.server(options=UNLIMITED)
        self.server.add_generic_rpc_handlers((_Relay(self),))
        if not self.server.add_insecure_port(f"{host}:{port}"):
            raise OSError(f"the gRPC relay could not listen on {host}:{port}")
        await self.server.start()

    async def stop(self, grace: float = 5.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
        if self.channel is not None:
            await self.channel.close()

    async def relay(self, method: str, requests: AsyncIterator[bytes],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        if method == SERVER_READY and self.unready():
            yield service_pb2.ServerReadyResponse(ready=False).SerializeToString()
            return
        call = None

        def cancel_upstream() -> None:      # a stub died: Triton may never answer this call
            if call is not None and not call.done():
                call.cancel()

        held = _Held(self.hold, cancel_upstream)
        refused: list[tuple[grpc.StatusCode, str]] = []   # why a later message of a stream was not served
        try:
            first = await anext(aiter(requests), None)
            if first is None:
                return
            refusal = await self._wake(held, method, first)
            if refusal:
                await context.abort(*refusal)

            async def upstream_requests() -> AsyncIterator[bytes]:
                yield first
                async for message in requests:
                    refusal = await self._wake(held, method, message)
                    if refusal:        # end the stream here; the handler answers it once Triton
                        refused.append(refusal)                     # has finished the rest
                        return
                    yield message

            assert self.channel is not None
            call = self.channel.stream_stream(method)(upstream_requests(),
                                                      metadata=forwarded_metadata(context.invocation_metadata()))
            if held.died:                    # died while the call was being woken
                call.cancel()
            relayed = 0
            try:
                async for response in call:
                    relayed += 1
                    yield response
                trailing = await call.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(forwarded_metadata(trailing))
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")
            except asyncio.CancelledError:   # raised by the read of a call cancelled for a death,
                if not (held.died and call.cancelled()) or _cancelling():   # not by the client leaving
                    raise
            # not a unary call whose answer was relayed just before the death
            if held.died and call.cancelled() and (relayed == 0 or method == STREAM_INFER):
                await context.abort(grpc.StatusCode.UNAVAILABLE, held.died)
            if refused:
                await context.abort(*refused[0])
        finally:
            if call is not None:
                call.cancel()          # the client went away: Triton cancels the request (a stream stops)
            await held.aclose()

    @staticmethod
    async def _wake(held: _Held, method: str, message: bytes) -> tuple[grpc.StatusCode, str] | None:
        """Load the deployment the message names and hold it; the status and reason when it cannot:
        RESOURCE_EXHAUSTED past its queue bound (like /v1's 429), UNAVAILABLE when it cannot load."""
        try:
            model = model_named(method, message)
        except DecodeError:            # not a valid message: Triton answers it in its own words
            return None
        try:
            await held.enter(model)
        except Overloaded as e:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{model}: {e}"
        except NotServable as e:
            return grpc.StatusCode.UNAVAILABLE, (f"{model}: {e} (retry in {max(1, round(e.retry_after))} s; "
                                                 "serverless-triton status shows the deployment's state)")
        except ApiError as e:
            return grpc.StatusCode.UNAVAILABLE, f"{model}: {e.message}"
        return None


class _Relay(grpc.GenericRpcHandler):
    """Every method as a bidirectional stream of raw bytes: gRPC's wire format is the same for
    unary and streaming calls, so one handler relays both."""

    def __init__(self, front: GrpcFront):
        self.front = front

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        async def relay(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async for response in self.front.relay(method, requests, context):   # an async generator
                yield response                                                     # function, as grpc.aio needs

        return grpc.stream_stream_rpc_method_handler(relay)
