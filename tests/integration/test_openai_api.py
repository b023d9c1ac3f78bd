"""The OpenAI-compatible API in front of a real Triton: the official `openai` client for the happy
paths, raw httpx for framing and errors, all through nginx and the gateway as `serve` runs them
(tests.support.serve.Front; the `serve` command itself: test_openai_serve.py)."""

from __future__ import annotations

import base64
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.serve.gateway.keys import KeyStore
from builder.serve.ports import free_ports
from builder.serve.triton_server import Ports, TritonServer
from tests.support.serve import Front

pytestmark = pytest.mark.slow
LLM = "smollm2-135m-instruct:int8"
EXACT = "smollm2-135m-instruct:fp32"   # greedy text independent of the host's runtime settings (fp32 runs f32/f32)
EMB = "all-minilm-l6-v2:int8"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gateway-state")


@pytest.fixture(scope="module")
def key(state_dir) -> str:
    return KeyStore(state_dir).create("tests")


@pytest.fixture(scope="module")
def gateway(llm_server, llm_repository, state_dir, key):
    """The gateway and nginx in front of the session's Triton, as `serve` runs them."""
    front = Front(llm_server, llm_repository, state_dir, max_body_bytes=BODY_LIMIT)
    try:
        yield front
    finally:
        front.stop()


@pytest.fixture(scope="module")
def client(gateway, key) -> openai.OpenAI:
    return gateway.client(key)


@pytest.fixture(scope="module")
def raw(gateway, key):
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        yield c


def triton_generate(server, model: str, body: dict) -> dict:
    r = httpx.post(f"http://{server.http_url}/v2/models/{model}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- models ---------------------------------------------------------------------------------------

def test_models_are_the_manifest_deployments(client, llm_repository):
    manifest = json.loads((llm_repository / "manifest.json").read_text())
    assert sorted(m.id for m in client.models.list()) == sorted(manifest["deployments"])
    assert client.models.retrieve(LLM).id == LLM
    assert client.models.retrieve("smollm2-135m-instruct-int8").id == LLM
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope:int8")
    assert e.value.code == "model_not_found"


# -- chat -----------------------------------------------------------------------------------------

def test_chat_stream_equals_non_stream_with_exact_usage(client, llm_server):
    full = client.chat.completions.create(model=LLM, messages=QUESTION, temperature=0, max_tokens=24)
    assert "Paris" in full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length")
    direct = triton_generate(llm_server, "smollm2-135m-instruct-int8",
                             {"messages": json.dumps(QUESTION), "max_tokens": 24})
    assert full.choices[0].message.content == direct["text_output"]
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (direct["prompt_tokens"],
                                                                        direct["completion_tokens"])
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=LLM, messages=QUESTION, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason] == [
        full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert len(with_choices) > 3, "tokens arrive in several chunks"


def test_stream_framing_ends_with_done(raw):
    r = raw.post("/v1/chat/completions", json={"model": LLM, "messages": QUESTION, "temperature": 0,
                                               "max_tokens": 8, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    assert blocks[-1] == "data: [DONE]"
    chunks = [json.loads(b[6:]) for b in blocks[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def test_max_completion_tokens_wins(client):
    r = client.chat.completions.create(model=LLM, messages=QUESTION, max_tokens=20, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_stop_strings_end_the_text(client):
    free = client.chat.completions.create(model=LLM, messages=QUESTION, temperature=0, max_tokens=24)
    text = free.choices[0].message.content
    word = "Paris"
    assert word in text
    stopped = client.chat.completions.create(model=LLM, messages=QUESTION, temperature=0, max_tokens=24, stop=[word])
    assert stopped.choices[0].message.content == text[:text.index(word)], "the stop string itself is left out"
    assert stopped.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_n_gives_choices(client):
    kw = {"model": LLM, "messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0.9,
          "max_tokens": 12, "seed": 7}
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    # n choices run as n concurrent requests (seeds 7, 8, 9) that the engine batches. How they meet in
    # a batch depends on timing, and batched logits differ in the last bits, so n>1 is not asserted to
    # repeat itself (OpenAI's seed is best effort too); each choice has its own seed, so they differ.
    many = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    texts = [c.message.content for c in many.choices]
    assert all(texts) and len(set(texts)) == 3
    assert 3 <= many.usage.completion_tokens <= 36 and many.usage.prompt_tokens == a.usage.prompt_tokens


def test_default_max_tokens_uses_the_room_left(client):
    r = client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "Say hello."}], temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1


def test_eight_concurrent_chats_are_all_answered(client):
    def one(i: int):
        return client.chat.completions.create(model=LLM, temperature=0, max_tokens=16,
                                              messages=[{"role": "user", "content": f"Count to {i + 2}."}])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(r.choices[0].message.content and r.usage.completion_tokens > 0 for r in results)


# -- completions ----------------------------------------------------------------------------------

def test_completions_match_triton(client, llm_server):
    prompt = "The capital of France is"
    r = client.completions.create(model=LLM, prompt=prompt, temperature=0, max_tokens=10)
    direct = triton_generate(llm_server, "smollm2-135m-instruct-int8", {"text_input": prompt, "max_tokens": 10})
    assert r.object == "text_completion" and r.choices[0].text == direct["text_output"]
    assert r.usage.prompt_tokens == direct["prompt_tokens"]
    echoed = client.completions.create(model=LLM, prompt=prompt, temperature=0, max_tokens=10, echo=True)
    assert echoed.choices[0].text == prompt + direct["text_output"]
    streamed = client.completions.create(model=LLM, prompt=prompt, temperature=0, max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == direct["text_output"]


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"logit_bias": {"1": 1}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"not_a_parameter": 1}, "not_a_parameter"),
    ({"max_tokens": 5000}, "max_tokens"),
])
def test_invalid_chat_requests_are_400_with_param(raw, body, param):
    r = raw.post("/v1/chat/completions", json={"model": LLM, "messages": QUESTION, **body})
    assert_error(r, 400, param)


def test_over_context_prompt_says_tokens_and_limit(raw, client):
    long = [{"role": "user", "content": "word " * 3000}]
    err = assert_error(raw.post("/v1/chat/completions", json={"model": LLM, "messages": long, "max_tokens": 10}),
                       400, "messages", "context_length_exceeded")
    assert "tokens" in err["message"] and "2048" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=LLM, messages=long, stream=True)


def test_malformed_json_is_400(raw):
    assert_error(raw.post("/v1/chat/completions", content=b'{"model": "x",'), 400, code="invalid_json")


def test_wrong_kind_is_400_and_unknown_model_404(raw):
    assert_error(raw.post("/v1/embeddings", json={"model": LLM, "input": "x"}), 400, "model")
    assert_error(raw.post("/v1/chat/completions", json={"model": "nope:int8", "messages": QUESTION}), 404,
                 "model", "model_not_found")


def test_penalties_are_applied_by_the_engine(client, raw):
    """A greedy answer that repeats itself changes under either penalty ('Hello, hello, hello, ...'
    becomes shorter), through both endpoints' engines; out of range is a 400."""
    repeat = [{"role": "user", "content": "Repeat the word 'hello' 50 times."}]

    def answer(stream=False, **kw) -> str:
        if stream:
            chunks = client.chat.completions.create(model=EXACT, messages=repeat, max_tokens=60, temperature=0,
                                                    stream=True, **kw)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        r = client.chat.completions.create(model=EXACT, messages=repeat, max_tokens=60, temperature=0, **kw)
        return r.choices[0].message.content

    base = answer()
    assert base.lower().count("hello") >= 10, base
    for kw in ({"frequency_penalty": 1.0}, {"presence_penalty": 1.0}):
        penalized = answer(**kw)
        assert penalized != base and penalized.lower().count("hello") < base.lower().count("hello"), (kw, penalized)
        assert answer(stream=True, **kw) == penalized, "streaming applies it too"
    assert answer(presence_penalty=0.0, frequency_penalty=0.0) == base
    for param in ("presence_penalty", "frequency_penalty"):
        r = raw.post("/v1/chat/completions", json={"model": LLM, "messages": QUESTION, "max_tokens": 4, param: 2.5})
        assert_error(r, 400, param)


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def test_response_format_json_schema_output_follows_the_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for question in ("Invent a person and give their name and age.", "Tell me about Alice, 30 years old.",
                     "JSON please: a dog named Rex who is 3."):
        messages = [{"role": "user", "content": question}]
        r = client.chat.completions.create(model=LLM, messages=messages, max_tokens=200, temperature=0,
                                           response_format=fmt)
        value = json.loads(r.choices[0].message.content)
        assert set(value) == {"name", "age"} and isinstance(value["name"], str) and type(value["age"]) is int, value
        assert r.choices[0].finish_reason == "stop"
        chunks = client.chat.completions.create(model=LLM, messages=messages, max_tokens=200, temperature=0,
                                                response_format=fmt, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    completion = client.completions.create(model=LLM, prompt="Name and age of a famous scientist:", max_tokens=100,
                                           temperature=0, extra_body={"response_format": fmt})
    assert set(json.loads(completion.choices[0].text)) == {"name", "age"}


def test_response_format_json_object_is_a_json_object(client):
    """Any JSON object. SmolLM2-135M (fp32) finishes these two within max_tokens; on other prompts it
    can loop inside a string until max_tokens (finish_reason length, the JSON cut short, as OpenAI warns)."""
    for question in ("Return JSON with a city and its country.",
                     "Return a JSON object with the keys name and age for a fictional person."):
        r = client.chat.completions.create(model=EXACT, messages=[{"role": "user", "content": question}],
                                           max_tokens=300, temperature=0, response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content
    plain = client.chat.completions.create(model=LLM, messages=QUESTION, max_tokens=20, temperature=0,
                                           response_format={"type": "text"})
    assert not plain.choices[0].message.content.lstrip().startswith("{")


def test_response_format_refusals_name_the_field(raw):
    def post(fmt):
        return raw.post("/v1/chat/completions", json={"model": LLM, "messages": QUESTION, "max_tokens": 8,
                                                      "response_format": fmt})

    bad_pattern = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?=a)a"}}}}}
    err = assert_error(post(bad_pattern), 400, "response_format")
    assert "lookaround" in err["message"] and "response_format.json_schema.schema" in err["message"], err
    assert_error(post({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "color"}}}), 400,
                 "response_format")
    assert_error(post({"type": "json_schema"}), 400, "response_format.json_schema")
    assert_error(post({"type": "xml"}), 400, "response_format.type")
    assert post({"type": "json_object"}).status_code == 200, "the engine still serves after refusals"


def test_missing_and_wrong_keys_are_401(gateway):
    assert_error(httpx.get(f"{gateway.url}/v1/models"), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError) as e:
        gateway.client("st-not-a-key").models.list()
    assert e.value.code == "invalid_api_key"
    assert httpx.get(f"{gateway.gateway_url}/auth").status_code == 401


def test_auth_endpoint_for_nginx(gateway, key):
    assert httpx.get(f"{gateway.gateway_url}/auth", headers={"Authorization": f"Bearer {key}"}).status_code == 204
    assert httpx.get(f"{gateway.url}/auth").status_code == 401     # not public: nginx sends /auth to Triton


def test_body_over_the_limit_is_413(raw):
    r = raw.post("/v1/chat/completions", content=b"x" * (BODY_LIMIT + 1), headers={"Content-Type": "application/json"})
    assert_error(r, 413, code="request_too_large")


def test_rate_limit_is_429_with_retry_after(gateway, state_dir):
    limited = KeyStore(state_dir).create("limited", rate_limit_per_min=2)
    c = gateway.client(limited)
    c.models.list()
    c.models.list()
    with pytest.raises(openai.RateLimitError) as e:
        c.models.list()
    assert 1 <= int(e.value.response.headers["Retry-After"]) <= 60


def test_revocation_applies_within_a_second(gateway, state_dir):
    store = KeyStore(state_dir)
    doomed = store.create("doomed")
    c = gateway.client(doomed)
    c.models.list()
    store.revoke("doomed")
    time.sleep(1.0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_last_used_is_recorded(gateway, state_dir, client):
    client.models.list()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        used = {k.name: k.last_used for k in KeyStore(state_dir).list()}
        if used.get("tests"):
            return
        time.sleep(0.5)
    pytest.fail("the gateway never flushed last-used times")


# -- embeddings: their own repository, Triton and gateway -----------------------------------------

@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory, build_cache, cache_dir):
    out = tmp_path_factory.mktemp("emb") / "repository"
    build([DeploymentSpec("all-minilm-l6-v2", kind="embedding", precisions=["int8"], memory_test=False)],
          BuildOptions(output=out, cache_dir=build_cache, echo=lambda _: None))
    with TritonServer(out, Ports(*free_ports(3)), cache_dir=cache_dir,
                      log_path=tmp_path_factory.mktemp("triton-emb") / "triton.log") as server:
        yield server


@pytest.fixture(scope="module")
def embedding_gateway(embedding_server, state_dir, key, tmp_path_factory):
    """Its own front (nginx state), with the same key: the key file is copied over."""
    emb_state = tmp_path_factory.mktemp("gateway-emb-state")
    shutil.copy2(state_dir / "api-keys.json", emb_state / "api-keys.json")
    front = Front(embedding_server, Path(embedding_server.repository), emb_state)
    try:
        yield front
    finally:
        front.stop()


def test_embeddings_float_and_base64_match_triton(embedding_gateway, embedding_server, key):
    texts = ["The cat sits on the mat.", "A completely different sentence about finance."] * 40
    c = embedding_gateway.client(key)
    b64 = c.embeddings.create(model=EMB, input=texts)                    # the client asks for base64
    floats = c.embeddings.create(model=EMB, input=texts, encoding_format="float")
    a = np.array([d.embedding for d in b64.data], dtype=np.float32)
    f = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert a.shape == (80, 384) and np.array_equal(a, f)
    assert b64.usage.prompt_tokens == floats.usage.prompt_tokens > 80
    body = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": texts[:2]}],
            "outputs": [{"name": "embedding"}]}
    r = httpx.post(f"http://{embedding_server.http_url}/v2/models/all-minilm-l6-v2-int8/infer", json=body, timeout=60)
    direct = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, -1)
    np.testing.assert_allclose(a[:2], direct, atol=1e-5)
    raw = httpx.post(f"{embedding_gateway.url}/v1/embeddings", headers={"Authorization": f"Bearer {key}"},
                     json={"model": EMB, "input": texts[0], "encoding_format": "base64"}).json()
    assert np.array_equal(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4"), a[0])


def test_embedding_refusals(embedding_gateway, key):
    h = {"Authorization": f"Bearer {key}"}

    def post(**b):
        return httpx.post(f"{embedding_gateway.url}/v1/embeddings", headers=h, json={"model": EMB, **b}, timeout=60)

    assert_error(post(input=[[101, 102]]), 400, "input")
    assert_error(post(input="x", dimensions=64), 400, "dimensions")
