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
