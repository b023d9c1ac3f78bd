"""The gateway app against a fake Triton (httpx.MockTransport): OpenAI framing, parameter mapping
and every error shape, in milliseconds. The real Triton is in tests/integration/test_openai_api.py."""

from __future__ import annotations

import base64
import json
import re

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from builder.serve.gateway.app import create_app
from builder.serve.gateway.config import GatewayConfig
from builder.serve.gateway.keys import KeyStore
from tests.support import manifests

LLM, EMB = "tiny:int8", "emb:int8"
CONTEXT = 64
ANSWER = ["The", " capital", " is", " Paris", "."]


def write_manifest(repository) -> None:
    manifests.write(repository, manifests.entry(LLM, engine={"context_size": CONTEXT, "max_batch_size": 4}),
                    manifests.entry(EMB, "embedding", engine={"context_size": 128, "max_batch_size": 2, "dimension": 3}))


class FakeTriton:
    """Answers like the ensembles: prompt_tokens = words of the prompt, a fixed answer, 400s
    with the ensemble prefix, SSE streams; records every request body."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.inputs = ["text_input", "messages", "max_tokens", "stop_words", "temperature", "top_p", "top_k",
                       "random_seed", "truncate"]
        self.fail_mid_stream = False
        self.loaded: set[str] = {m for e in (manifests.entry(LLM), manifests.entry(EMB, "embedding"))
                                 for m in e.triton_models}          # serve starts with every model loaded
        self.repository_calls: list[tuple[str, str]] = []
        self.down = False
        self.stub_dead = False    # Triton's answer when a Python stub died (it keeps the model READY)

    def prompt_tokens(self, body: dict) -> int:
        text = body.get("text_input") or " ".join(m["content"] for m in json.loads(body["messages"]))
        return len(text.split()) + (4 if "messages" in body else 0)

    def result(self, body: dict) -> tuple[list[str], dict]:
        prompt, max_tokens = self.prompt_tokens(body), body["max_tokens"]
        if prompt + max_tokens > CONTEXT:
            raise ValueError(f"the prompt has {prompt} tokens and max_tokens is {max_tokens}: together they exceed "
                             f"the context size of {CONTEXT} tokens; shorten the prompt")
        words, reason = ANSWER[:max_tokens], "stop" if max_tokens >= len(ANSWER) else "length"
        return words, {"prompt_tokens": prompt, "completion_tokens": len(words), "finish_reason": reason, "notice": ""}

    def repository(self, path: str, body: dict) -> httpx.Response:
        """Triton's model-repository API: what scale to zero loads and unloads."""
        if path == "/v2/repository/index":
            return httpx.Response(200, json=[{"name": m, "version": "1", "state": "READY"} for m in sorted(self.loaded)])
        model, action = path.split("/")[4], path.split("/")[5]
        self.repository_calls.append((action, model))
        (self.loaded.add if action == "load" else self.loaded.discard)(model)
        return httpx.Response(200)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path.startswith("/v2/repository/"):
            return self.repository(path, json.loads(request.content or b"{}"))
        if path == "/v2/models/stats":
            return httpx.Response(200, json={"model_stats": [{"name": m, "last_inference": 0} for m in self.loaded]})
        model = path.split("/")[3]
        if model not in self.loaded:
            return httpx.Response(400, json={"error": f"Request for unknown model: '{model}' is not found"})
        if path.endswith("/config"):
            return httpx.Response(200, json={"name": model, "max_batch_size": 2,
                                             "input": [{"name": n} for n in self.inputs]})
        body = json.loads(request.content)
        self.requests.append((path, body))
        if self.stub_dead:
            error = {"error": f"in ensemble '{model}', Stub process '{model}_0_0' is not healthy."}
            if path.endswith("/generate_stream"):     # Triton refuses a stream in one SSE event
                return httpx.Response(400, content=f"data: {json.dumps(error)}\n\n".encode())
            return httpx.Response(400, json=error)
        if path.endswith("/infer"):
            texts = body["inputs"][0]["data"]
            vectors = np.array([[len(t), 0.5, -1.25] for t in texts], dtype=np.float32)
            header = json.dumps({"outputs": [{"name": "embedding", "datatype": "FP32", "shape": list(vectors.shape),
                                              "parameters": {"binary_data_size": vectors.nbytes}}]}).encode()
            return httpx.Response(200, content=header + vectors.tobytes(),
                                  headers={"Inference-Header-Content-Length": str(len(header))})
        try:
            words, meta = self.result(body)
        except ValueError as e:
            return httpx.Response(400, json={"error": f"in ensemble '{model}', {e}"})
        if path.endswith("/generate"):
            return httpx.Response(200, json={"text_output": "".join(words), "model_name": model, **meta})
        events = [{"text_output": w, **meta, "completion_tokens": i + 1, "finish_reason": ""} for i, w in enumerate(words)]
        events.append({"text_output": "", **meta})
        if self.fail_mid_stream:
            events = events[:2] + [{"error": "in ensemble 'x', engine crashed"}]
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})


@pytest.fixture
def repo(tmp_path):
    write_manifest(tmp_path)
    tok = tmp_path / "emb-tokenize" / "1" / "tokenizer"
    tok.mkdir(parents=True)
    return tmp_path


@pytest.fixture
def triton():
    return FakeTriton()


@pytest.fixture
def keys(tmp_path):
    return KeyStore(tmp_path / "state")


@pytest.fixture
def key(keys):
    return keys.create("test")


@pytest.fixture
def client(repo, triton, keys, key):
    config = GatewayConfig(triton_url="127.0.0.1:1", repository=repo, state_dir=keys.state_dir, max_body_bytes=4096)
    with TestClient(create_app(config, transport=httpx.MockTransport(triton)),
                    headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def chat(client, **body):
    body = {"model": LLM, "messages": [{"role": "user", "content": "What is the capital?"}], **body}
    return client.post("/v1/chat/completions", json=body)


def events(response) -> list:
    out = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- models -----------------------------------------------------------------------------------------

def test_models_lists_the_manifest_deployments(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in data["data"]] == [
        (EMB, "model", "serverless-triton"), (LLM, "model", "serverless-triton")]
    assert client.get(f"/v1/models/{LLM}").json()["id"] == LLM
    assert client.get("/v1/models/tiny-int8").json()["id"] == LLM, "the Triton name is accepted too"
    assert_error(client.get("/v1/models/other:int8"), 404, "model", "model_not_found")


# -- chat -------------------------------------------------------------------------------------------

def test_chat_maps_parameters_and_answers_in_openai_shape(client, triton):
    r = chat(client, max_tokens=5, temperature=0, top_p=0.5, top_k=7, seed=3, stop="xyz")
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == LLM and data["id"].startswith("chatcmpl-")
    assert data["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "The capital is Paris.",
                                                        "refusal": None}, "logprobs": None, "finish_reason": "stop"}]
    assert data["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}
    path, body = triton.requests[-1]
    assert path == "/v2/models/tiny-int8/generate"
    assert json.loads(body.pop("messages")) == [{"role": "user", "content": "What is the capital?"}]
    assert body == {"max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 7, "random_seed": 3,
                    "stop_words": ["xyz"]}


def test_max_completion_tokens_wins_and_length_is_reported(client, triton):
    data = chat(client, max_tokens=5, max_completion_tokens=2).json()
    assert triton.requests[-1][1]["max_tokens"] == 2
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 2


def test_default_max_tokens_is_the_room_left_in_the_context(client, triton):
    data = chat(client).json()
    assert [b["max_tokens"] for _, b in triton.requests] == [CONTEXT - 1, CONTEXT - 8]
    assert data["choices"][0]["message"]["content"] == "The capital is Paris."


def test_openai_defaults_temperature_one(client, triton):
    chat(client, max_tokens=3)
    body = triton.requests[-1][1]
    assert body["temperature"] == 1.0 and "random_seed" not in body and "top_p" not in body


def test_content_parts_developer_role_and_joined_text(client, triton):
    r = chat(client, max_tokens=3, messages=[{"role": "developer", "content": "Be brief."},
                                             {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}])
    assert r.status_code == 200, r.text
    assert json.loads(triton.requests[-1][1]["messages"]) == [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "a\nb"}]


def test_n_choices_run_concurrently_with_derived_seeds(client, triton):
    data = chat(client, max_tokens=5, n=3, seed=10, temperature=0.7).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert sorted(b["random_seed"] for _, b in triton.requests) == [10, 11, 12]
    assert data["usage"] == {"prompt_tokens": 8, "completion_tokens": 15, "total_tokens": 23}


def test_stream_framing_role_first_finish_once_usage_and_done(client, triton):
    r = chat(client, max_tokens=5, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = events(r)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == LLM for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == chat(client, max_tokens=5).json()["choices"][0]["message"]["content"]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert reasons == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 8, "completion_tokens": 5,
                                                                   "total_tokens": 13}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert triton.requests[0][0] == "/v2/models/tiny-int8-stream/generate_stream"


def test_stream_without_usage_has_no_usage_field(client):
    chunks = events(chat(client, max_tokens=5, stream=True))[:-1]
    assert all("usage" not in c for c in chunks)


def test_stream_with_n_gives_each_choice_its_role_and_one_finish(client):
    chunks = events(chat(client, max_tokens=5, stream=True, n=2))[:-1]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert [m["finish_reason"] for m in mine if m["finish_reason"]] == ["stop"]
        assert "".join(m["delta"].get("content", "") for m in mine) == "The capital is Paris."


def test_refused_stream_is_a_plain_400(client):
    assert_error(chat(client, max_tokens=CONTEXT, stream=True), 400, "messages", "context_length_exceeded")


def test_failure_mid_stream_is_one_error_event_then_close(client, triton):
    triton.fail_mid_stream = True
    ev = events(chat(client, max_tokens=5, stream=True))
    assert ev[-1] != "[DONE]" and "[DONE]" not in ev
    assert ev[-1]["error"]["message"] == "engine crashed"
    assert ev[-1]["error"].keys() == {"message", "type", "param", "code"}


# -- completions ------------------------------------------------------------------------------------

def test_completions_prompt_echo_and_default_16(client, triton):
    data = client.post("/v1/completions", json={"model": LLM, "prompt": ["Hello there"], "echo": True}).json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "Hello thereThe capital is Paris."
    assert triton.requests[-1][1]["max_tokens"] == 16 and triton.requests[-1][1]["text_input"] == "Hello there"


def test_completions_several_prompts_count_each_prompt_once(client):
    data = client.post("/v1/completions", json={"model": LLM, "prompt": ["a b", "c"], "n": 2, "max_tokens": 5}).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 20, "total_tokens": 23}


def test_completions_stream(client):
    ev = events(client.post("/v1/completions", json={"model": LLM, "prompt": "Hi", "max_tokens": 5, "stream": True}))
    assert ev[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in ev[:-1]) == "The capital is Paris."
    assert [c["choices"][0]["finish_reason"] for c in ev[:-1] if c["choices"][0]["finish_reason"]] == ["stop"]


def test_completions_refuse_token_ids_and_suffix(client):
    assert_error(client.post("/v1/completions", json={"model": LLM, "prompt": [1, 2]}), 400, "prompt")
    assert_error(client.post("/v1/completions", json={"model": LLM, "prompt": "a", "suffix": "b"}), 400, "suffix",
                 "unsupported_parameter")
    assert_error(client.post("/v1/completions", json={"model": LLM, "prompt": []}), 400, "prompt")


# -- embeddings -------------------------------------------------------------------------------------

def test_embeddings_float_and_base64_agree_and_batches_split(client, triton):
    texts = ["a", "bb", "ccc"]
    floats = client.post("/v1/embeddings", json={"model": EMB, "input": texts, "encoding_format": "float"}).json()
    b64 = client.post("/v1/embeddings", json={"model": EMB, "input": texts, "encoding_format": "base64"}).json()
    assert [d["index"] for d in floats["data"]] == [0, 1, 2]
    assert floats["data"][2]["embedding"] == [3.0, 0.5, -1.25]
    for f, b in zip(floats["data"], b64["data"]):
        assert np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4").tolist() == f["embedding"]
    infer = [b for p, b in triton.requests if p.endswith("/infer")]
    assert [b["inputs"][0]["shape"] for b in infer[:2]] == [[2, 1], [1, 1]], "split by the model's max_batch_size"
    assert floats["usage"]["prompt_tokens"] == 0, "no tokenizer.json in this fake repository"


def test_embeddings_refusals(client):
    def post(**b):
        return client.post("/v1/embeddings", json={"model": EMB, **b})

    assert_error(post(input=[[1, 2]]), 400, "input")
    assert_error(post(input=[]), 400, "input")
    assert_error(post(input=""), 400, "input")
    assert_error(post(input="x", dimensions=2), 400, "dimensions", "unsupported_parameter")
    assert post(input="x", dimensions=3).status_code == 200, "the native dimension is fine"
    assert_error(post(input="x", encoding_format="int8"), 400, "encoding_format")
    assert_error(client.post("/v1/embeddings", json={"model": LLM, "input": "x"}), 400, "model")
    assert_error(chat(client, model=EMB), 400, "model")


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": "x"}, "max_completion_tokens"),
    ({"n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"model": ""}, "model"),
])
def test_invalid_requests_are_400_naming_the_field(client, body, param):
    assert_error(chat(client, **body), 400, param)


def test_over_context_prompt_passes_the_engine_message(client):
    err = assert_error(chat(client, max_tokens=60), 400, "messages", "context_length_exceeded")
    assert err["message"].startswith("the prompt has 8 tokens"), "ensemble prefix removed"
    assert_error(client.post("/v1/completions", json={"model": LLM, "prompt": "a " * 70}), 400, "prompt")


def test_engine_extras_refused_unless_the_model_declares_them(client, triton):
    """A repository built before penalties and guided decoding: a 400 naming the parameter and the fix."""
    err = assert_error(chat(client, presence_penalty=0.5), 400, "presence_penalty", "unsupported_parameter")
    assert "rebuild" in err["message"] and "presence_penalty input" in err["message"]
    err = assert_error(chat(client, response_format={"type": "json_object"}), 400, "response_format",
                       "unsupported_parameter")
    assert "guided_decoding_guide_type input" in err["message"] and "rebuild" in err["message"]
    assert chat(client, max_tokens=3, presence_penalty=0, response_format={"type": "text"}).status_code == 200
    body = triton.requests[-1][1]
    assert not {"presence_penalty", "guided_decoding_guide_type"} & set(body), "defaults are not sent"
    triton.inputs += ["presence_penalty", "frequency_penalty", "guided_decoding_guide_type", "guided_decoding_guide"]
    client.app.state.gateway.triton.client._configs.clear()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert chat(client, max_tokens=3, presence_penalty=0.5, frequency_penalty=-1, response_format=fmt).status_code == 200
    body = triton.requests[-1][1]
    assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == -1
    assert body["guided_decoding_guide_type"] == "json_schema" and json.loads(body["guided_decoding_guide"]) == schema
    assert chat(client, max_tokens=3, response_format={"type": "json_object"}).status_code == 200
    body = triton.requests[-1][1]
    assert body["guided_decoding_guide_type"] == "json" and "guided_decoding_guide" not in body
    assert_error(chat(client, max_tokens=3, response_format={"type": "json_schema"}), 400,
                 "response_format.json_schema")
    assert_error(chat(client, max_tokens=3, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": [1]}}), 400, "response_format.json_schema.schema")
    assert_error(chat(client, max_tokens=3, response_format={"type": "yaml"}), 400, "response_format.type")


def test_malformed_json_and_non_object_bodies(client):
    for raw in (b'{"model": ', b"[]", b"", b"\xff\xfe"):
        assert_error(client.post("/v1/chat/completions", content=raw), 400, code=None)


def test_missing_wrong_and_revoked_keys_are_401(client, keys, key):
    assert_error(client.get("/v1/models", headers={"Authorization": ""}), 401, code="invalid_api_key")
    assert_error(client.get("/v1/models", headers={"Authorization": "Bearer st-wrong"}), 401, code="invalid_api_key")
    assert client.get("/auth").status_code == 204
    assert client.get("/auth", headers={"Authorization": "Bearer st-wrong"}).status_code == 401


def test_rate_limit_is_429_with_retry_after(client, keys):
    limited = keys.create("limited", rate_limit_per_min=2)
    h = {"Authorization": f"Bearer {limited}"}
    assert [client.get("/v1/models", headers=h).status_code for _ in range(2)] == [200, 200]
    r = client.get("/v1/models", headers=h)
    assert_error(r, 429, code="rate_limit_exceeded")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert client.get("/auth", headers=h).status_code == 429
    r = client.get("/auth?via=nginx", headers=h)   # for nginx: a 401 that says why (its 403 means "address")
    assert r.status_code == 401 and r.headers["X-Auth-Error"] == "rate_limit_exceeded" and "Retry-After" in r.headers
    r = client.get("/auth?via=nginx", headers={"Authorization": "Bearer st-wrong"})
    assert r.status_code == 401 and r.headers["X-Auth-Error"] == "invalid_api_key"


def test_body_over_the_limit_is_413(client):
    assert_error(client.post("/v1/chat/completions", content=b"x" * 5000), 413, code="request_too_large")

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    assert_error(client.post("/v1/chat/completions", content=chunks()), 413, code="request_too_large")


def test_triton_down_is_503_with_retry_after(client, triton):
    triton.down = True
    r = chat(client, max_tokens=3)
    assert_error(r, 503, code="service_unavailable")
    assert r.headers["Retry-After"] == "1"


def test_unknown_route_and_method_are_openai_shaped(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)


def test_public_gateway_needs_no_key(repo, triton):
    config = GatewayConfig(triton_url="127.0.0.1:1", repository=repo, public=True)
    with TestClient(create_app(config, transport=httpx.MockTransport(triton))) as c:
        assert c.get("/v1/models").status_code == 200
        assert c.get("/auth").status_code == 204


def test_keys_required_without_state_dir_is_refused(repo):
    with pytest.raises(ValueError, match="state_dir"):
        create_app(GatewayConfig(triton_url="x:1", repository=repo))


def test_no_traceback_on_internal_errors(client, monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr("builder.serve.gateway.chat.plans_for", boom)
    with TestClient(client.app, raise_server_exceptions=False, headers=client.headers) as c:
        r = chat(c, max_tokens=3)
    err = assert_error(r, 500, code="internal_error")
    assert "secret" not in err["message"] and not re.search(r"Traceback|File \"", r.text)
