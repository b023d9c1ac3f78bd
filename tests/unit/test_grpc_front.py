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
