"""The one metrics endpoint of a real `serve` (Triton, the series its Python models write, the
gateway, nginx): known traffic over /v1 with two keys and over /v2, then every counter checked
against the usage the clients received, histogram counts against the requests, the per-key series,
HTTP answers by route and code, a cold start, and no key anywhere in the text."""

from __future__ import annotations

import socket
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from conftest import TINY_NAME
from prometheus_client.parser import text_string_to_metric_families

from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.serve.ports import free_ports
from tests.support.serve import CLI, Serve, stop_serve

pytestmark = pytest.mark.slow
LLM, EMB = f"{TINY_NAME}:fp32", "all-minilm-l6-v2:int8"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def repository(tmp_path_factory, build_cache, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("metrics") / "repository"
    build([DeploymentSpec(TINY_NAME, source=str(tiny_llama), precisions=["fp32"], context_size=256, max_batch_size=2),
           DeploymentSpec("all-minilm-l6-v2", kind="embedding", precisions=["int8"], memory_test=False)],
          BuildOptions(output=out, cache_dir=build_cache, echo=lambda _: None))
    return out


@pytest.fixture(scope="module")
def deployment(repository, tmp_path_factory):
    with Serve(repository, tmp_path_factory.mktemp("serve-metrics")) as dep:
        yield dep


def scrape(dep: Serve) -> str:
    r = httpx.get(f"http://127.0.0.1:{dep.metrics}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def series(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(s: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for got, v in s.get(name, []) if all(got.get(k) == want for k, want in labels.items()))


class Ledger:
    """What the clients received, added up the way the metrics must."""

    def __init__(self):
        self.prompt = self.generation = self.requests = self.multi_token = 0
        self.finish: dict[str, int] = defaultdict(int)
        self.by_key: dict[tuple[str, str], int] = defaultdict(int)

    def llm(self, prompt: int, generation: int, finish: list[str], key: str | None) -> None:
        self.prompt += prompt
        self.generation += generation
        for reason in finish:
            self.finish[reason] += 1
        if key:
            self.by_key[(key, "prompt")] += prompt
            self.by_key[(key, "generation")] += generation


def test_every_series_matches_what_the_clients_received(deployment):
    dep = deployment
    keys = {"team-a": dep.create_key("team-a"), "team-b": dep.create_key("team-b")}
    a, b = dep.openai(keys["team-a"]), dep.openai(keys["team-b"])

    # a cold start first: the engine-side series of a model start at zero when it loads again
    unload = subprocess.run(CLI + ["unload", LLM, "--state-dir", str(dep.state)], check=False, capture_output=True,
                            text=True,
                            timeout=120)
    assert unload.returncode == 0, unload.stderr
    ledger = Ledger()
    tokens_per_request: list[int] = []

    def chat(client, key, **kw):
        r = client.chat.completions.create(model=LLM, messages=QUESTION, temperature=0, **kw)
        ledger.llm(r.usage.prompt_tokens, r.usage.completion_tokens, [c.finish_reason for c in r.choices], key)
        tokens_per_request.append(r.usage.completion_tokens)

    chat(a, "team-a", max_tokens=8)                      # wakes the deployment (the cold start)
    chat(a, "team-a", max_tokens=3)
    chat(b, "team-b", max_tokens=12)
    stream = a.chat.completions.create(model=LLM, messages=QUESTION, max_tokens=10, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    usage = chunks[-1].usage
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    ledger.llm(usage.prompt_tokens, usage.completion_tokens, finish, "team-a")
    tokens_per_request.append(usage.completion_tokens)
    completion = b.completions.create(model=LLM, prompt=["Paris is", "The sea is"], max_tokens=5, temperature=0)
    ledger.llm(completion.usage.prompt_tokens, completion.usage.completion_tokens,
               [c.finish_reason for c in completion.choices], "team-b")
    # each prompt's tokens are known when both ran to max_tokens; otherwise only their sum is
    both_full = all(c.finish_reason == "length" for c in completion.choices)
    tokens_per_request += [5, 5] if both_full else []
    embedded = b.embeddings.create(model=EMB, input=["a text", "another text", "a third, longer text"])
    refused = httpx.post(f"{dep.url}/v1/chat/completions", headers={"Authorization": f"Bearer {keys['team-a']}"},
                         json={"model": LLM, "messages": QUESTION, "temperature": 5}, timeout=60)
    assert refused.status_code == 400
    too_long = httpx.post(f"{dep.url}/v1/chat/completions", headers={"Authorization": f"Bearer {keys['team-b']}"},
                          json={"model": LLM, "messages": [{"role": "user", "content": "word " * 400}]}, timeout=60)
    assert too_long.status_code == 400                                 # refused inside Triton, relayed
    v2 = dep.generate(f"{TINY_NAME}-fp32", keys["team-a"], text_input="Hello there", max_tokens=4)
    assert v2.status_code == 200, v2.text
    ledger.llm(v2.json()["prompt_tokens"], v2.json()["completion_tokens"], [v2.json()["finish_reason"]], None)
    tokens_per_request.append(v2.json()["completion_tokens"])
    engine_requests = 7        # 3 chats, 1 stream, 2 completion prompts, 1 /v2

    deadline = time.monotonic() + 30    # the last updates travel from the stubs to Triton after the answers
    while True:
        text = scrape(dep)
        s = series(text)
        if total(s, "serverless_triton_request_success_total", model=LLM) >= engine_requests or \
                time.monotonic() > deadline:
            break
        time.sleep(0.5)

    # the engines' counters equal the usage the clients received
    assert total(s, "serverless_triton_prompt_tokens_total", model=LLM) == ledger.prompt
    assert total(s, "serverless_triton_generation_tokens_total", model=LLM) == ledger.generation
    for reason, count in ledger.finish.items():
        assert total(s, "serverless_triton_request_success_total", model=LLM, finish_reason=reason) == count
    assert total(s, "serverless_triton_request_success_total", model=LLM) == engine_requests
    assert total(s, "serverless_triton_embedding_texts_total", model=EMB) == 3
    assert total(s, "serverless_triton_embedding_tokens_total", model=EMB) == embedded.usage.prompt_tokens

    # histograms: one observation per engine request
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "queue_time_seconds"):
        assert total(s, f"serverless_triton_{name}_count", model=LLM) == engine_requests, name
        assert total(s, f"serverless_triton_{name}_bucket", model=LLM, le="+Inf") == engine_requests, name
    multi = sum(1 for n in tokens_per_request if n > 1)
    tpot = total(s, "serverless_triton_time_per_output_token_seconds_count", model=LLM)
    assert tpot == multi if both_full else multi <= tpot <= multi + 2
    assert total(s, "serverless_triton_requests_running", model=LLM) == 0
    assert total(s, "serverless_triton_requests_waiting", model=LLM) == 0
    assert "serverless_triton_kv_cache_usage_ratio" in s

    # the gateway: per key (the name, never the key), by route and code, client errors, cold starts
    for (key, kind), count in ledger.by_key.items():
        assert total(s, "serverless_triton_api_key_tokens_total", api_key=key, model=LLM, type=kind) == count
    assert total(s, "serverless_triton_api_key_tokens_total", api_key="team-b", model=EMB, type="embedding") == \
        embedded.usage.prompt_tokens
    http = "serverless_triton_http_requests_total"
    assert total(s, http, route="/v1/chat/completions", code="200") == 4
    assert total(s, http, route="/v1/chat/completions", code="400") == 2
    assert total(s, http, route="/v1/completions", code="200") == 1
    assert total(s, http, route="/v1/embeddings", code="200") == 1
    assert total(s, http, route="/v2/models/{model}/{action}", code="200") == 1     # the gateway's /v2 relay
    assert total(s, "serverless_triton_request_errors_total", model=LLM, reason="client error") == 2
    assert total(s, "serverless_triton_cold_starts_total", model=LLM) == 1
    assert total(s, "serverless_triton_cold_start_seconds_count", model=LLM) == 1
    assert total(s, "serverless_triton_model_loaded", model=LLM) == 1
    assert total(s, "serverless_triton_model_loaded", model=EMB) == 1

    # Triton's own series, relabelled to the deployment with the Triton model kept
    # (the parser reads Triton's counters with a _total suffix; the text keeps Triton's names)
    assert total(s, "nv_inference_request_success_total", model=LLM, triton_model=f"{TINY_NAME}-fp32-engine") >= 1
    assert f'nv_inference_request_success{{model="{LLM}",version="1",triton_model="{TINY_NAME}-fp32-engine"}}' in text
    assert total(s, "serverless_triton_metrics_source_up", source="gateway") == 1
    for key in keys.values():
        assert key not in text and key[3:] not in text and key[-12:] not in text


def test_metrics_are_not_on_the_public_port(deployment):
    key = deployment.create_key("scraper")
    for headers in ({}, {"Authorization": f"Bearer {key}"}):
        r = httpx.get(f"{deployment.url}/metrics", headers=headers, timeout=30)
        assert r.status_code != 200 and "serverless_triton" not in r.text and "nv_inference" not in r.text


def test_no_proxy_serves_triton_relabelled_and_no_metrics_records_nothing_of_ours(repository, tmp_path):
    """`serve --no-proxy --no-metrics`: the endpoint still answers with Triton's series, relabelled;
    the engines' own series are not recorded (Triton's environment turns them off)."""
    http, grpc, metrics = free_ports(3)
    out = tmp_path / "serve.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(CLI + ["serve", "-r", str(repository), "--no-proxy", "--no-metrics", "--http-port",
                                       str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while b"Ctrl-C to stop." not in out.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        assert f"metrics  http://127.0.0.1:{metrics}/metrics" in out.read_text()
        r = httpx.post(f"http://127.0.0.1:{http}/v2/models/{TINY_NAME}-fp32/generate",
                       json={"text_input": "Hello", "max_tokens": 4}, timeout=120)
        assert r.status_code == 200, r.text
        time.sleep(1)
        text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=30).text
        s = series(text)
        assert total(s, "nv_inference_request_success_total", model=LLM, triton_model=f"{TINY_NAME}-fp32") == 1
        assert not [name for name in s if name.startswith("serverless_triton_")
                    and name != "serverless_triton_metrics_source_up"], text
    finally:
        stop_serve(proc)


def test_a_busy_metrics_port_is_one_line_before_triton_starts(repository, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http, grpc = free_ports(2)
        r = subprocess.run(CLI + ["serve", "-r", str(repository), "--no-proxy", "--http-port", str(http),
                                  "--grpc-port", str(grpc), "--metrics-port", str(port)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: the metrics endpoint cannot listen on 127.0.0.1:{port} (Address already in use): "
        "pick another --metrics-port or --metrics-address")
