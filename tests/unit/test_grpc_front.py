"""The gRPC relay's reading of a call: which model it names (only for the calls that need it
loaded) and which metadata it passes on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from builder.serve.gateway.grpc_front import SERVICE, forwarded_metadata, model_named


@pytest.mark.parametrize(("method", "message"), [
    ("ModelInfer", service_pb2.ModelInferRequest(model_name="m-int8", raw_input_contents=[b"x" * 1000])),
    ("ModelStreamInfer", service_pb2.ModelInferRequest(model_name="m-int8", id="r1")),
    ("ModelMetadata", service_pb2.ModelMetadataRequest(name="m-int8", version="1")),
    ("ModelConfig", service_pb2.ModelConfigRequest(name="m-int8")),
])
def test_calls_that_need_the_model_loaded_name_it(method, message):
    assert model_named(SERVICE + method, message.SerializeToString()) == "m-int8"


@pytest.mark.parametrize("method", ["ModelReady", "ServerReady", "ServerLive", "ModelStatistics",
                                    "RepositoryIndex", "RepositoryModelLoad"])
def test_readiness_and_server_calls_wake_nothing(method):
    message = service_pb2.ModelReadyRequest(name="m-int8").SerializeToString()
    assert model_named(SERVICE + method, message) is None


def test_a_request_without_a_model_names_none_and_garbage_is_a_decode_error():
    assert model_named(SERVICE + "ModelInfer", b"") is None
    with pytest.raises(DecodeError):
        model_named(SERVICE + "ModelInfer", b"\xff\xff\xff")


def test_hop_headers_stay_and_the_call_metadata_goes_on():
    md = [SimpleNamespace(key=k, value=v) for k, v in [(":authority", "x"), ("user-agent", "grpc-python"),
                                                       ("grpc-timeout", "5S"), ("content-type", "application/grpc"),
                                                       ("te", "trailers"), ("authorization", "Bearer k"),
                                                       ("triton-request-id", "7")]]
    assert forwarded_metadata(md) == (("authorization", "Bearer k"), ("triton-request-id", "7"))
    assert forwarded_metadata(None) == ()


def test_server_ready_is_false_while_a_deployment_is_reloading_and_relayed_otherwise():
    """A real relay on a free port: ready=false comes from the gateway while Lifecycle.unready() names
    a deployment; otherwise the call goes on to Triton (here: nothing listens, so UNAVAILABLE)."""
    import asyncio
    import socket

    import grpc

    from builder.serve.gateway.grpc_front import GrpcFront

    async def scenario() -> tuple[bool, grpc.StatusCode]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]          # closed again: nothing listens there
        reloading: list[str] = ["m:int8"]
        front = GrpcFront(f"127.0.0.1:{dead}", lambda _: None, lambda: list(reloading))
        await front.start(port)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(SERVICE + "ServerReady",
                                           request_serializer=service_pb2.ServerReadyRequest.SerializeToString,
                                           response_deserializer=service_pb2.ServerReadyResponse.FromString)
                answer = await call(service_pb2.ServerReadyRequest(), timeout=10)
                reloading.clear()
                with pytest.raises(grpc.aio.AioRpcError) as relayed:
                    await call(service_pb2.ServerReadyRequest(), timeout=10)
                return answer.ready, relayed.value.code()
        finally:
            await front.stop(0)

    ready, relayed = asyncio.run(scenario())
    assert ready is False and relayed == grpc.StatusCode.UNAVAILABLE


def test_a_stream_inside_a_stub_that_dies_is_cancelled_upstream_and_answered_unavailable():
    """A real relay before a real gRPC server that never answers (an engine whose stub died): the
    heal's event ends the call with UNAVAILABLE and cancels it upstream, instead of a hang."""
    import asyncio
    import socket

    import grpc

    from builder.serve.gateway.grpc_front import GrpcFront
    from builder.serve.gateway.lifecycle import LOADED, Lifecycle, Tracked
    from tests.unit.test_reliability import Reloading

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    async def scenario() -> tuple[grpc.StatusCode, str, bool, int]:
        upstream_cancelled = asyncio.Event()

        async def silent(requests, context):      # takes the request, never answers
            context.add_done_callback(lambda _: upstream_cancelled.set())
            async for _ in requests:
                await asyncio.get_running_loop().create_future()
            yield b""

        class Silent(grpc.GenericRpcHandler):
            def service(self, details):
                return grpc.stream_stream_rpc_method_handler(silent)

        upstream = grpc.aio.server()
        upstream.add_generic_rpc_handlers((Silent(),))
        triton_port, port = free_port(), free_port()
        upstream.add_insecure_port(f"127.0.0.1:{triton_port}")
        await upstream.start()
        dead: set[str] = set()
        lc = Lifecycle(Reloading(), dead_stubs=lambda models: dead & set(models))
        lc.track([Tracked("m:fp32", ("m-engine", "m"), 0.0)])
        lc.deployments["m:fp32"].state = LOADED
        front = GrpcFront(f"127.0.0.1:{triton_port}", lambda model: lc.serving("m:fp32") if model == "m" else None)
        await front.start(port)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream(SERVICE + "ModelStreamInfer")(
                    iter([service_pb2.ModelInferRequest(model_name="m").SerializeToString()]), timeout=20)
                while lc.deployments["m:fp32"].in_flight == 0:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)              # inside the "engine"
                dead.add("m-engine")
                await lc.heal()
                with pytest.raises(grpc.aio.AioRpcError) as died:
                    async for _ in call:
                        pass
                await asyncio.wait_for(upstream_cancelled.wait(), 5)
                while lc.deployments["m:fp32"].in_flight:
                    await asyncio.sleep(0.01)
                return died.value.code(), died.value.details(), upstream_cancelled.is_set(), \
                    lc.deployments["m:fp32"].in_flight
        finally:
            await front.stop(0)
            await upstream.stop(0)

    code, details, cancelled, in_flight = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert code == grpc.StatusCode.UNAVAILABLE and "died while it ran this call" in details
    assert cancelled and in_flight == 0
