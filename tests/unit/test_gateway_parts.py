"""The gateway's pure parts: manifest reading, parameter mapping, messages, error params."""

from __future__ import annotations

import json

import numpy as np
import pytest

from builder.serve.gateway.__main__ import parse_args
from builder.serve.gateway.deployments import Catalog, deployments
from builder.serve.gateway.errors import ApiError, param_of
from builder.serve.gateway.messages import normalize_messages
from builder.serve.gateway.params import choice_seeds, sampling_body
from builder.serve.gateway.schemas import ChatCompletionRequest
from builder.serve.gateway.triton_client import decode_infer, triton_error
from tests.support import manifests


def test_deployments_reads_entrypoints_and_engine(tmp_path):
    manifests.write(tmp_path, manifests.entry("m:int8", engine={"context_size": 2048, "max_batch_size": 4}),
                    manifests.entry("e:fp32", "embedding", engine={"max_batch_size": 64, "dimension": 384}))
    deps = deployments(tmp_path)
    assert sorted(deps) == ["e:fp32", "m:int8"]
    assert (deps["m:int8"].infer, deps["m:int8"].stream, deps["m:int8"].context_size) == ("m-int8", "m-int8-stream", 2048)
    assert deps["m:int8"].models[0] == "m-preprocessing" and deps["m:int8"].models[-1] == "m-int8-stream"
    assert (deps["e:fp32"].infer, deps["e:fp32"].stream, deps["e:fp32"].dimension) == ("e-fp32", None, 384)
    assert deployments(tmp_path / "none") == {}
    (tmp_path / "manifest.json").write_text('{"schema_version": 1, "deployments": {}}')
    assert deployments(tmp_path) == {}                      # an old manifest: logged, nothing served


def test_catalog_follows_manifest_changes(tmp_path, monkeypatch):
    monkeypatch.setattr("builder.serve.gateway.deployments.RECHECK_SECONDS", 0.0)
    manifests.write(tmp_path, manifests.entry("m:int8"))
    catalog = Catalog(tmp_path)
    assert catalog.resolve("m-int8").id == "m:int8" and catalog.owner("m-int8-stream").id == "m:int8"
    assert catalog.owner("m-preprocessing") is None          # shared models belong to no single deployment
    manifests.write(tmp_path, manifests.entry("m:int8"), manifests.entry("n:fp16"))
    assert catalog.resolve("n:fp16").infer == "n-fp16"
    with pytest.raises(ApiError) as e:
        catalog.resolve("m:int8", "embedding")
    assert e.value.status == 400 and e.value.param == "model"


def test_param_of_pydantic_locations():
    assert param_of(("messages", 0, "role")) == "messages[0].role"
    assert param_of(("body", "temperature")) == "temperature"
    assert param_of(("stop", "list[str]", 2)) == "stop[2]"


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m:int8", "messages": [{"role": "user", "content": "x"}], **kw})


def test_sampling_body_mapping():
    assert sampling_body(request()) == {"temperature": 1.0}
    assert sampling_body(request(temperature=0.3, top_p=0, top_k=5)) == {"temperature": 0.3, "top_k": 1}
    assert sampling_body(request(top_k=-1, stop="END")) == {"temperature": 1.0, "top_k": 0, "stop_words": ["END"]}
    assert sampling_body(request(stop=["", "a"], truncate=True)) == {"temperature": 1.0, "stop_words": ["a"],
                                                                     "truncate": True}
    assert sampling_body(request(presence_penalty=0.0, frequency_penalty=0.0)) == {"temperature": 1.0}
    assert sampling_body(request(presence_penalty=-2, frequency_penalty=1.5)) == {
        "temperature": 1.0, "presence_penalty": -2, "frequency_penalty": 1.5}


@pytest.mark.parametrize("fmt,fields", [
    (None, {}),
    ({"type": "text"}, {}),
    ({"type": "json_object"}, {"guided_decoding_guide_type": "json"}),
    ({"type": "json_schema", "json_schema": {"name": "p"}}, {"guided_decoding_guide_type": "json"}),
    ({"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": {"type": "object"}}},
     {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": '{"type": "object"}'}),
])
def test_response_format_becomes_guided_decoding(fmt, fields):
    body = sampling_body(request(response_format=fmt) if fmt else request())
    assert {k: v for k, v in body.items() if k.startswith("guided")} == fields
    assert "response_format" not in body


def test_engine_refusals_get_the_openai_param():
    from builder.serve.gateway.deployments import Deployment
    from builder.serve.gateway.generation import Plan

    plan = Plan(Deployment.__new__(Deployment), {}, 5)
    e = plan.named(ApiError(400, "guided_decoding_guide: schema.pattern uses '(?=': lookaround ..."))
    assert e.param == "response_format" and e.message.startswith("response_format.json_schema.schema: schema.pattern")
    assert plan.named(ApiError(400, "presence_penalty must be between -2 and 2 (0 = off), got 3.0")).param == \
        "presence_penalty"


def test_choice_seeds():
    assert choice_seeds(None, 2) == [None, None]
    assert choice_seeds(5, 3) == [5, 6, 7]
    assert choice_seeds(-1, 1) == [2**63 - 1]


def test_messages_normalized():
    assert normalize_messages([{"role": "assistant", "content": "a", "refusal": None, "name": "bot"}]) == [
        {"role": "assistant", "content": "a"}]
    with pytest.raises(ApiError) as e:
        normalize_messages([{"role": "user", "content": [{"type": "text"}]}])
    assert e.value.param == "messages[0].content[0].text"
    with pytest.raises(ApiError) as e:
        normalize_messages([{"role": "assistant", "content": None, "tool_calls": [{}]}])
    assert e.value.param == "messages[0].tool_calls"


def test_triton_errors_mapped():
    e = triton_error(400, "in ensemble 'm-int8', max_tokens 5000 does not fit the context size 2048", "m-int8")
    assert (e.status, e.code, e.message) == (400, "context_length_exceeded",
                                             "max_tokens 5000 does not fit the context size 2048")
    assert triton_error(404, "Request for unknown model: 'm' is not found", "m").status == 503
    assert triton_error(400, "Request for unknown model: 'm' has no available versions", "m").status == 503
    assert triton_error(500, "boom", "m").headers["Retry-After"] == "1"
    assert triton_error(400, "internal error in stream: KeyError", "m").status == 502


def test_decode_infer_json_and_binary():
    header = {"outputs": [{"name": "embedding", "shape": [1, 2], "datatype": "FP32", "data": [1.5, -2.0]}]}
    assert decode_infer(json.dumps(header).encode(), None, "embedding").tolist() == [[1.5, -2.0]]
    vec = np.array([[0.25, 4.0]], dtype="<f4")
    other = np.array([7], dtype="<i4")
    head = json.dumps({"outputs": [
        {"name": "other", "shape": [1], "parameters": {"binary_data_size": 4}},
        {"name": "embedding", "shape": [1, 2], "parameters": {"binary_data_size": 8}}]}).encode()
    assert decode_infer(head + other.tobytes() + vec.tobytes(), str(len(head)), "embedding").tolist() == [[0.25, 4.0]]


def test_command_line_requires_a_state_dir_unless_public(capsys):
    args = parse_args(["--triton", "127.0.0.1:8000", "--repository", "r", "--port", "9000", "--public"])
    assert args.public and args.state_dir is None and args.host == "127.0.0.1"
    with pytest.raises(SystemExit):
        parse_args(["--triton", "127.0.0.1:8000", "--repository", "r", "--port", "9000"])
    assert "--state-dir is required" in capsys.readouterr().err
