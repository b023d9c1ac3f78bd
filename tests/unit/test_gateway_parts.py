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


def write_manifest(path, deps):
    (path / "manifest.json").write_text(json.dumps({"schema_version": 1, "deployments": deps}))


def test_deployments_reads_entrypoints_and_engine(tmp_path):
    write_manifest(tmp_path, {
        "m:int8": {"kind": "llm", "entrypoints": {"infer": "m-int8", "stream": "m-int8-stream"},
                   "engine": {"context_size": 2048, "max_batch_size": 4}},
        "e:fp32": {"kind": "embedding", "entrypoint": "e-fp32", "engine": {"max_batch_size": 64, "dimension": 384}},
        "Bad Name": {"kind": "llm"}})
    deps = deployments(tmp_path)
    assert sorted(deps) == ["e:fp32", "m:int8"], "names that do not parse are skipped"
    assert (deps["m:int8"].infer, deps["m:int8"].stream, deps["m:int8"].context_size) == ("m-int8", "m-int8-stream", 2048)
    assert (deps["e:fp32"].infer, deps["e:fp32"].stream, deps["e:fp32"].dimension) == ("e-fp32", None, 384)
    assert deployments(tmp_path / "none") == {}


def test_catalog_follows_manifest_changes(tmp_path, monkeypatch):
    monkeypatch.setattr("builder.serve.gateway.deployments.RECHECK_SECONDS", 0.0)
    write_manifest(tmp_path, {"m:int8": {"kind": "llm"}})
    catalog = Catalog(tmp_path)
    assert catalog.resolve("m-int8").id == "m:int8"
    write_manifest(tmp_path, {"m:int8": {"kind": "llm"}, "n:fp16": {"kind": "llm"}})
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
