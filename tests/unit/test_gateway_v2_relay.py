"""The /v2 relay (builder/serve/gateway/v2_relay.py) against the fake Triton of test_gateway_app:
bodies and answers pass through byte for byte (JSON, binary tensors), an unloaded deployment is
woken, a full queue is 429 in Triton's error shape, and the deployment is held while a call runs.
The real Triton behind nginx is in tests/integration/test_scale_to_zero.py and test_reliability.py."""

from __future__ import annotations

import httpx
import pytest
from test_gateway_app import EMB, LLM, FakeTriton
from test_gateway_scale_to_zero import app_client


@pytest.fixture
def triton():
    return FakeTriton()


def test_generate_passes_through_and_counts_as_a_request_of_its_deployment(tmp_path, triton):
    with app_client(tmp_path, triton) as client:
        r = client.post("/v2/models/tiny-int8/generate", json={"text_input": "Hello there", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["text_output"] == "The capital is"
        assert triton.requests[-1] == ("/v2/models/tiny-int8/generate", {"text_input": "Hello there", "max_tokens": 3})
        d = client.app.state.gateway.lifecycle.deployments[LLM]
        assert d.in_flight == 0 and d.last_request > 0
        metrics = client.get("/metrics").text
        assert 'route="/v2/models/{model}/{action}"' in metrics


def test_triton_errors_keep_triton_status_and_shape(tmp_path, triton):
    with app_client(tmp_path, triton) as client:
        r = client.post("/v2/models/tiny-int8/generate", json={"text_input": "a " * 80, "max_tokens": 3})
        assert r.status_code == 400 and "exceed the context size" in r.json()["error"]
        r = client.post("/v2/models/nobody/generate", json={"text_input": "x", "max_tokens": 1})
        assert r.status_code == 400 and "unknown model" in r.json()["error"]      # no deployment: Triton's answer
        r = client.post("/v2/models/tiny-int8/generate_stream/x", json={})
        assert r.status_code == 404
        r = client.post("/v2/models/tiny-int8/ready", json={})     # not an inference call: nginx sends it to Triton
        assert r.status_code == 404 and "infer, generate, generate_stream" in r.json()["error"]


def test_generate_stream_passes_event_by_event_and_holds_the_deployment_until_it_ends(tmp_path, triton):
    with app_client(tmp_path, triton) as client:
        body = {"text_input": "Hello there", "max_tokens": 3}
        direct = triton(httpx.Request("POST", "http://t/v2/models/tiny-int8-stream/generate_stream", json=body))
        with client.stream("POST", "/v2/models/tiny-int8-stream/generate_stream", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-accel-buffering"] == "no"          # nginx passes each event at once
            d = client.app.state.gateway.lifecycle.deployments[LLM]
            assert d.in_flight == 1                                   # held while it streams
            relayed = r.read()
        assert relayed == direct.content and d.in_flight == 0


def test_a_stream_refused_by_triton_keeps_its_status_and_a_dead_stub_is_a_503(tmp_path, triton):
    with app_client(tmp_path, triton) as client:
        r = client.post("/v2/models/tiny-int8-stream/generate_stream", json={"text_input": "a " * 80, "max_tokens": 3})
        assert r.status_code == 400 and "exceed the context size" in r.json()["error"]
        triton.stub_dead = True
        r = client.post("/v2/models/tiny-int8-stream/generate_stream", json={"text_input": "Hi", "max_tokens": 3})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"].startswith("in ensemble") and "is not healthy" in r.json()["error"]
        assert client.app.state.gateway.lifecycle.deployments[LLM].in_flight == 0


def test_binary_infer_headers_and_bytes_pass_through_unchanged(tmp_path, triton):
    with app_client(tmp_path, triton) as client:
        body = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["ab", "abcd"]}]}
        direct = triton(httpx.Request("POST", "http://t/v2/models/emb-int8/infer", json=body))
        r = client.post("/v2/models/emb-int8/versions/1/infer", json=body)
        assert r.status_code == 200 and r.content == direct.content
        assert r.headers["inference-header-content-length"] == direct.headers["inference-header-content-length"]
        assert triton.requests[-1][0] == "/v2/models/emb-int8/versions/1/infer"


def test_an_unloaded_deployment_is_woken_by_a_relayed_call(tmp_path, triton):
    with app_client(tmp_path, triton, idle_timeout=600) as client:
        assert client.post(f"/admin/deployments/{EMB}/unload").json()["state"] == "unloaded"
        body = {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["wake up"]}]}
        assert client.post("/v2/models/emb-int8/infer", json=body).status_code == 200
        status = {d["model"]: d for d in client.get("/admin/deployments").json()["deployments"]}
        assert status[EMB]["state"] == "loaded" and status[EMB]["cold_starts"] == 1


def test_past_the_queue_bound_the_answer_is_429_at_once_in_tritons_shape(tmp_path, triton):
    with app_client(tmp_path, triton, max_queue=0) as client:
        d = client.app.state.gateway.lifecycle.deployments[LLM]
        assert d.max_in_flight == 4                      # max_batch_size 4, no queue
        d.in_flight = d.max_in_flight                    # four calls already inside
        seen = len(triton.requests)
        r = client.post("/v2/models/tiny-int8/generate", json={"text_input": "Hi", "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "at capacity" in r.json()["error"] and len(triton.requests) == seen   # Triton never saw it
        d.in_flight = 0
        assert client.post("/v2/models/tiny-int8/generate", json={"text_input": "Hi", "max_tokens": 2}).status_code == 200


def test_triton_down_is_503_not_a_500(tmp_path, triton):
    with app_client(tmp_path, triton) as client:
        triton.down = True
        r = client.post("/v2/models/tiny-int8/generate", json={"text_input": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and "not reachable" in r.json()["error"]
