"""Metrics without servers: Triton model -> deployment names, the merge of Triton's and the
gateway's texts (names kept, relabelled, one family once), the gateway's own series against a
fake Triton (per-key usage, route templates, client errors), and the engine-side series written
by separate processes and added up. The real thing: tests/integration/test_metrics.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_gateway_app import EMB, LLM, FakeTriton, write_manifest

from backends.contract.naming import deployment_of
from builder.serve.gateway.app import create_app
from builder.serve.gateway.config import GatewayConfig
from builder.serve.gateway.keys import KeyStore
from builder.serve.metrics_endpoint import blocks, engine_series, merge, relabel_line


@pytest.mark.parametrize("triton_model,deployment", [
    ("smollm2-135m-instruct-int8", "smollm2-135m-instruct:int8"),
    ("smollm2-135m-instruct-int8-engine", "smollm2-135m-instruct:int8"),
    ("smollm2-135m-instruct-int8-engine-call", "smollm2-135m-instruct:int8"),
    ("smollm2-135m-instruct-fp16-stream", "smollm2-135m-instruct:fp16"),
    ("all-minilm-l6-v2-fp8-encoder", "all-minilm-l6-v2:fp8"),
    ("a-fp16-int8", "a-fp16:int8"),
    ("smollm2-135m-instruct-preprocessing", None),      # shared by every precision
    ("all-minilm-l6-v2-tokenize", None),
    ("int8", None),
])
def test_deployment_of(triton_model, deployment):
    assert deployment_of(triton_model) == deployment


TRITON = """# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="tiny-int8-engine",version="1"} 3
nv_inference_request_success{model="tiny-preprocessing",version="1"} 5
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.25
# HELP serverless_triton_request_errors_total Requests that failed
# TYPE serverless_triton_request_errors_total counter
serverless_triton_request_errors_total{model="tiny:int8",triton_model="tiny-int8-engine",reason="engine error"} 1
"""
GATEWAY = """# HELP serverless_triton_request_errors_total Requests that failed (gateway)
# TYPE serverless_triton_request_errors_total counter
serverless_triton_request_errors_total{model="tiny:int8",reason="client error"} 2.0
# HELP serverless_triton_http_requests_total Gateway answers
# TYPE serverless_triton_http_requests_total counter
serverless_triton_http_requests_total{code="200",route="/v1/chat/completions"} 4.0
"""


def samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_merge_keeps_names_relabels_triton_and_writes_each_family_once():
    text = merge(TRITON, GATEWAY)
    got = samples(text)
    assert got[("nv_inference_request_success_total",
                (("model", "tiny:int8"), ("triton_model", "tiny-int8-engine"), ("version", "1")))] == 3
    # a model shared by every precision keeps its name in both labels
    assert got[("nv_inference_request_success_total",
                (("model", "tiny-preprocessing"), ("triton_model", "tiny-preprocessing"), ("version", "1")))] == 5
    assert "nv_inference_request_success{" in text       # Triton's own names, untouched
    assert text.count("# TYPE serverless_triton_request_errors_total counter") == 1
    errors = {dict(k[1])["reason"]: v for k, v in got.items() if k[0] == "serverless_triton_request_errors_total"}
    assert errors == {"engine error": 1, "client error": 2}
    # the gateway's series are not relabelled (no triton_model added)
    assert 'serverless_triton_request_errors_total{model="tiny:int8",reason="client error"} 2.0' in text


def test_relabel_line_keeps_escapes_and_values():
    line = r'nv_x{model="m-int8-engine",note="a \"q\" \\ b"} 1e+06'
    assert relabel_line(line) == r'nv_x{model="m:int8",note="a \"q\" \\ b",triton_model="m-int8-engine"} 1e+06'
    assert relabel_line("nv_cpu_utilization 0.5") == "nv_cpu_utilization 0.5"


def test_blocks_group_histogram_samples_under_their_family():
    text = """# HELP h_seconds h
# TYPE h_seconds histogram
h_seconds_bucket{le="1"} 1
h_seconds_bucket{le="+Inf"} 2
h_seconds_sum 3
h_seconds_count 2
"""
    assert list(blocks(text)) == ["h_seconds"] and len(blocks(text)["h_seconds"].samples) == 4


# -- the gateway's series ------------------------------------------------------------------------

@pytest.fixture
def gateway(tmp_path):
    write_manifest(tmp_path)
    (tmp_path / "emb-tokenize" / "1" / "tokenizer").mkdir(parents=True)
    keys = KeyStore(tmp_path / "state")
    first, second = keys.create("team-a"), keys.create("team-b")
    config = GatewayConfig(triton_url="127.0.0.1:1", repository=tmp_path, state_dir=keys.state_dir)
    with TestClient(create_app(config, transport=httpx.MockTransport(FakeTriton()))) as c:
        yield c, first, second


def chat(client, key, **body):
    body = {"model": LLM, "messages": [{"role": "user", "content": "What is the capital?"}], **body}
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_gateway_counts_usage_per_key_name_routes_and_client_errors(gateway):
    client, first, second = gateway
    usages = {"team-a": [0, 0], "team-b": [0, 0]}
    for name, key, body in (("team-a", first, {}), ("team-a", first, {"max_tokens": 2}), ("team-b", second, {})):
        usage = chat(client, key, **body).json()["usage"]
        usages[name][0] += usage["prompt_tokens"]
        usages[name][1] += usage["completion_tokens"]
    streamed = chat(client, second, stream=True, stream_options={"include_usage": True})
    last = [line for line in streamed.text.splitlines() if line.startswith("data: {")][-1]
    usage = __import__("json").loads(last[6:])["usage"]
    usages["team-b"][0] += usage["prompt_tokens"]
    usages["team-b"][1] += usage["completion_tokens"]
    assert chat(client, first, temperature=9).status_code == 400          # refused by the gateway
    assert chat(client, "st-wrong").status_code == 401                     # no deployment: no client error
    text = client.get("/metrics").text
    got = samples(text)
    for name, (prompt, generation) in usages.items():
        assert got[("serverless_triton_api_key_tokens_total",
                    (("api_key", name), ("model", LLM), ("type", "prompt")))] == prompt
        assert got[("serverless_triton_api_key_tokens_total",
                    (("api_key", name), ("model", LLM), ("type", "generation")))] == generation
    route = "/v1/chat/completions"
    assert got[("serverless_triton_http_requests_total", (("code", "200"), ("route", route)))] == 4
    assert got[("serverless_triton_http_requests_total", (("code", "400"), ("route", route)))] == 1
    assert got[("serverless_triton_http_requests_total", (("code", "401"), ("route", route)))] == 1
    assert got[("serverless_triton_request_errors_total", (("model", LLM), ("reason", "client error")))] == 1
    assert got[("serverless_triton_model_loaded", (("model", EMB),))] == 1
    assert first not in text and second not in text and first[:12] not in text


def test_unknown_paths_are_one_route_label(gateway):
    client, first, _ = gateway
    for path in ("/v1/nope-1", "/v1/nope-2"):
        assert client.get(path, headers={"Authorization": f"Bearer {first}"}).status_code == 404
    got = samples(client.get("/metrics").text)
    assert got[("serverless_triton_http_requests_total", (("code", "404"), ("route", "unmatched")))] == 2


def test_no_metrics_gateway_serves_an_empty_text(tmp_path):
    write_manifest(tmp_path)
    config = GatewayConfig(triton_url="127.0.0.1:1", repository=tmp_path, public=True, metrics=False)
    with TestClient(create_app(config, transport=httpx.MockTransport(FakeTriton()))) as c:
        assert c.post("/v1/chat/completions", json={"model": LLM, "messages": [{"role": "user", "content": "hi"}]}
                      ).status_code == 200
        assert c.get("/metrics").text == ""


# -- the engine side: stub processes writing files, added up by the endpoint --------------------

RECORD = """
import sys
from backends.metrics import ModelMetrics
m = ModelMetrics(sys.argv[1])
m.answered(7, 5, "length")
m.answered(3, 1, "stop")
m.failed("cancelled")
m.timed(0.01, 0.1, 0.5, 5)
m.gauge("requests_running", int(sys.argv[2]))
m.embedded(2, 10)
"""


def record(directory, triton_model: str, running: int, *env: tuple[str, str]) -> None:
    """One Triton stub's updates, in a process of its own (multiprocess mode is chosen at import)."""
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), **dict(env)}
    subprocess.run([sys.executable, "-c", RECORD, triton_model, str(running)], env=environment, check=True,
                   timeout=60, cwd=Path(__file__).parents[2])


def test_engine_series_add_up_over_stub_processes(tmp_path):
    record(tmp_path, "tiny-int8-stream", 2)
    record(tmp_path, "tiny-int8-stream", 1)      # the same model loaded again (a new stub): sums go on
    text = engine_series(tmp_path)
    got = samples(text)
    labels = (("model", "tiny:int8"), ("triton_model", "tiny-int8-stream"))
    assert got[("serverless_triton_prompt_tokens_total", labels)] == 20
    assert got[("serverless_triton_generation_tokens_total", labels)] == 12
    assert got[("serverless_triton_request_success_total", (("finish_reason", "length"), *labels))] == 2
    assert got[("serverless_triton_request_errors_total", (*labels[:1], ("reason", "cancelled"), *labels[1:]))] == 2
    assert got[("serverless_triton_time_to_first_token_seconds_count", labels)] == 2
    assert got[("serverless_triton_time_per_output_token_seconds_sum", labels)] == pytest.approx(0.2)
    assert got[("serverless_triton_embedding_tokens_total", labels)] == 20
    # the stubs are gone: their gauges with them
    assert ("serverless_triton_requests_running", labels) not in got
    assert "# HELP serverless_triton_prompt_tokens_total Prompt tokens of answered requests" in text


def test_engine_series_off_writes_nothing(tmp_path):
    record(tmp_path, "tiny-int8-stream", 2, ("SERVERLESS_TRITON_METRICS", "off"))
    assert list(tmp_path.iterdir()) == []
