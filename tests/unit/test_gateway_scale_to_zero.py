"""Scale to zero through the gateway app, against the fake Triton of test_gateway_app: idle
deployments unloaded, woken by /v1 requests and by /v2 requests (nginx's auth_request), a failed
load answered 503 with Retry-After, and the status/wake/unload endpoints the CLI uses."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient
from test_gateway_app import EMB, LLM, FakeTriton, chat, write_manifest

from builder.serve.gateway.app import create_app, v2_model
from builder.serve.gateway.config import GatewayConfig
from tests.support import manifests


@pytest.fixture
def triton():
    return FakeTriton()


def app_client(tmp_path, triton, **config):
    write_manifest(tmp_path)
    gateway = GatewayConfig(triton_url="127.0.0.1:1", repository=tmp_path, public=True, **config)
    return TestClient(create_app(gateway, transport=httpx.MockTransport(triton)))


def wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_an_idle_deployment_is_unloaded_and_the_next_request_wakes_it(tmp_path, triton):
    llm_models = set(manifests.entry(LLM).triton_models)
    with app_client(tmp_path, triton, idle_timeout=0.3) as client:
        assert chat(client, max_tokens=3).status_code == 200
        wait_for(lambda: not llm_models & triton.loaded)            # the sweeper unloaded all of it
        status = {d["model"]: d for d in client.get("/admin/deployments").json()["deployments"]}
        assert status[LLM]["state"] == "unloaded"
        answer = chat(client, max_tokens=3)                          # woken, then answered
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
        assert llm_models <= triton.loaded
        status = {d["model"]: d for d in client.get("/admin/deployments").json()["deployments"]}
        assert status[LLM]["state"] == "loaded" and status[LLM]["cold_starts"] == 1
        loads = [m for a, m in triton.repository_calls if a == "load"]
        assert sorted(loads) == sorted(llm_models) and loads[-1] == "tiny-int8"   # once each; the ensemble last


def test_never_unloaded_with_idle_timeout_zero(tmp_path, triton):
    with app_client(tmp_path, triton, idle_timeout=0.0) as client:
        assert chat(client, max_tokens=3).status_code == 200
        time.sleep(1.5)
        assert not triton.repository_calls


def test_a_v2_request_wakes_its_deployment_through_auth(tmp_path, triton):
    with app_client(tmp_path, triton, idle_timeout=600) as client:
        assert client.post(f"/admin/deployments/{LLM}/unload").json()["state"] == "unloaded"
        assert "tiny-int8" not in triton.loaded
        r = client.get("/auth?via=nginx", headers={"X-Original-URI": "/v2/models/tiny-int8-stream/generate_stream"})
        assert r.status_code == 204 and "tiny-int8-stream" in triton.loaded
        assert client.get("/auth", headers={"X-Original-URI": "/v2/health/ready"}).status_code == 204
        assert client.post(f"/admin/deployments/{EMB}/unload").status_code == 200
        assert client.post("/admin/deployments/emb-int8/wake").json()["state"] == "loaded"
        assert client.post(f"/admin/deployments/{EMB}/explode").status_code == 404
        assert client.post("/admin/deployments/nope:int8/wake").status_code == 404


def test_a_failed_load_answers_503_with_retry_after_and_backs_off(tmp_path, triton):
    with app_client(tmp_path, triton, idle_timeout=600) as client:
        client.post(f"/admin/deployments/{LLM}/unload")
        real = triton.repository

        def failing(path, body):
            if path.endswith("tiny-int8-engine/load"):
                return httpx.Response(400, json={"error": "failed to load 'tiny-int8-engine': not enough memory"})
            return real(path, body)

        triton.repository = failing
        r = chat(client, max_tokens=3)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "failed to load 'tiny-int8-engine': not enough memory" in r.json()["error"]["message"]
        calls = len(triton.repository_calls)
        assert chat(client, max_tokens=3).status_code == 503          # backing off: no second attempt yet
        assert len(triton.repository_calls) == calls
        nginx = client.get("/auth?via=nginx", headers={"X-Original-URI": "/v2/models/tiny-int8/generate"})
        assert nginx.status_code == 401 and nginx.headers["X-Auth-Error"] == "service_unavailable"
        assert int(nginx.headers["Retry-After"]) >= 1
        relayed = client.post("/v2/models/tiny-int8/generate", json={"text_input": "Hi", "max_tokens": 2})
        assert relayed.status_code == 503 and int(relayed.headers["Retry-After"]) >= 1      # the /v2 relay:
        assert "not enough memory" in relayed.json()["error"]                               # Triton's shape


@pytest.mark.parametrize("uri,model", [
    ("/v2/models/m-int8/generate", "m-int8"), ("/v2/models/m-int8-stream/generate_stream", "m-int8-stream"),
    ("/v2/models/m-int8/versions/1/infer", "m-int8"), ("/v2/models/m-int8/infer?x=1", "m-int8"),
    ("/v2/models/m-int8/config", "m-int8"), ("/v2/models/m-int8", "m-int8"), ("/v2/models/m-int8/stats", "m-int8"),
    ("/v2/models/m-int8/ready", None), ("/v2/models/m-int8/versions/1/ready", None), ("/v2/models/stats", None),
    ("/v2/health/ready", None), ("/v2/repository/index", None), ("", None)])
def test_v2_model_of_an_inference_uri(uri, model):
    assert v2_model(uri) == model
