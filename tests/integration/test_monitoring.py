"""Monitoring against a live `serverless-triton serve` (an LLM and an embedding deployment, API keys
on): a real Prometheus scrapes its metrics endpoint with deploy/monitoring/prometheus.yml, and every
query of the Grafana dashboard returns data after traffic that makes it (chat, streams, embeddings,
a refused request, cold starts, requests waiting for a batch slot); `serverless-triton top --once`
shows the deployments from the same endpoint."""

from __future__ import annotations

import math
import subprocess
import threading
import time

import httpx
import pytest
from conftest import TINY_NAME

from backends.errors import InvalidArgumentError
from builder.build.sources.checkpoint import default_embedding_dir
from builder.serve.control import act
from tests.support.checkpoints import make_tiny_roberta
from tests.support.prometheus import Prometheus, dashboard, dashboard_queries, panels, substitute
from tests.support.serve import CLI, Serve

pytestmark = pytest.mark.slow
LLM = f"{TINY_NAME}:fp32"
EMB = "tiny-roberta:fp32"
KEY_NAME = "monitoring"
MAX_BATCH = 2                     # four concurrent streams: two wait for a batch slot
# Grafana's built-in intervals, as wide as the test's traffic (a rate needs two samples in its window)
GRAFANA_VARIABLES = {"model": ".*", "__rate_interval": "3m", "__interval": "15s", "__range": "15m"}


@pytest.fixture(scope="module")
def repository(tmp_path_factory, build_cache, tiny_llama):
    from builder.build.deployment import DeploymentSpec
    from builder.build.pipeline import BuildOptions, build

    root = tmp_path_factory.mktemp("monitored")
    roberta = make_tiny_roberta(root / "tiny-roberta", default_embedding_dir())
    specs = [DeploymentSpec(TINY_NAME, source=str(tiny_llama), precisions=["fp32"], context_size=256,
                            max_batch_size=MAX_BATCH),
             DeploymentSpec("tiny-roberta", kind="embedding", source=str(roberta), precisions=["fp32"],
                            pooling="cls", max_batch_size=8)]
    build(specs, BuildOptions(output=root / "repository", cache_dir=build_cache, echo=lambda _: None))
    return root / "repository"


@pytest.fixture(scope="module")
def deployment(repository, tmp_path_factory):
    # a long idle timeout: nothing unloads by itself, the test unloads (and the next request wakes)
    with Serve(repository, tmp_path_factory.mktemp("serve-monitored"), "--idle-timeout", "600") as dep:
        yield dep


@pytest.fixture(scope="module")
def key(deployment):
    return deployment.create_key(KEY_NAME)


@pytest.fixture(scope="module")
def prometheus(deployment, tmp_path_factory):
    with Prometheus(f"127.0.0.1:{deployment.metrics}", tmp_path_factory.mktemp("prometheus")) as p:
        yield p


def chat(dep: Serve, key: str, **kw):
    return dep.openai(key).chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Tell me about the sea."}], temperature=0, **kw)


def stream(dep: Serve, key: str) -> None:
    for _ in chat(dep, key, max_tokens=24, stream=True, stream_options={"include_usage": True}):
        pass


def unload(dep: Serve, model: str) -> None:
    """Unload now; refused while a request is still in flight, so retried briefly."""
    deadline = time.monotonic() + 30
    while True:
        try:
            act(dep.state, model, "unload")
            return
        except InvalidArgumentError:
            assert time.monotonic() < deadline, f"{model} never became idle enough to unload"
            time.sleep(0.5)


def traffic(dep: Serve, key: str) -> None:
    """One round of everything the dashboard shows: answers, streams (four at once: two wait), an
    embedding, a request refused for its deployment (prompt over the context), and a cold start."""
    assert chat(dep, key, max_tokens=16).usage.completion_tokens >= 1
    threads = [threading.Thread(target=stream, args=(dep, key)) for _ in range(2 * MAX_BATCH)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    vectors = dep.openai(key).embeddings.create(model=EMB, input=["the sea", "a mountain"])
    assert len(vectors.data) == 2
    refused = httpx.post(f"{dep.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                         json={"model": LLM, "max_tokens": 4,
                               "messages": [{"role": "user", "content": "sea " * 2000}]})
    assert refused.status_code == 400, refused.text
    unload(dep, LLM)
    assert chat(dep, key, max_tokens=4).usage.completion_tokens >= 1     # woken on demand: a cold start


@pytest.fixture(scope="module")
def scraped(deployment, key, prometheus):
    """Two rounds of traffic with scrapes between and after them (a rate needs an increase between
    two samples: the first round creates the series, the second moves them)."""
    for _ in range(2):
        traffic(deployment, key)
        time.sleep(4)                     # four scrapes at 1 s
    return prometheus


def test_prometheus_scrapes_the_serve(scraped, deployment):
    (target,) = scraped.target_health()
    assert target["health"] == "up", target
    assert target["scrapeUrl"] == f"http://127.0.0.1:{deployment.metrics}/metrics"
    names = set(scraped.api("label/__name__/values"))
    assert {"serverless_triton_generation_tokens_total", "nv_inference_request_success"} <= names


def test_the_model_variable_lists_every_deployment(scraped):
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "model"]
    metric, label = variable["definition"].removeprefix("label_values(").removesuffix(")").split(", ")
    assert label == "model"
    assert {LLM, EMB} <= set(scraped.api(f"label/{label}/values", **{"match[]": metric}))


@pytest.mark.parametrize("title, expr", dashboard_queries(dashboard()),
                         ids=[f"{t}: {e[:60]}" for t, e in dashboard_queries(dashboard())])
def test_every_dashboard_query_returns_data(scraped, title, expr):
    result = scraped.query(substitute(expr, GRAFANA_VARIABLES))
    values = [float(s["value"][1]) for s in result]
    assert any(math.isfinite(v) for v in values), f"{title}: {expr} -> {result}"


def test_dashboard_panels_name_their_series_per_deployment():
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] == "serverless-triton"
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "model"}
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for p in panels(board):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        for t in p["targets"]:
            per_model = "serverless_triton_http_requests_total" in t["expr"] or 'model=~"$model"' in t["expr"]
            assert per_model, f"{p['title']}: {t['expr']} ignores the model variable"


def test_errors_and_cold_starts_are_counted_where_the_panels_look(scraped):
    errors = scraped.query('sum by (model, reason) (serverless_triton_request_errors_total)')
    assert any(s["metric"] == {"model": LLM, "reason": "client error"} and float(s["value"][1]) >= 2
               for s in errors), errors
    cold = scraped.query(f'serverless_triton_cold_starts_total{{model="{LLM}"}}')
    assert cold and float(cold[0]["value"][1]) >= 2, cold
    usage = scraped.query(f'sum by (api_key) (serverless_triton_api_key_tokens_total{{model="{LLM}"}})')
    assert [s["metric"] for s in usage] == [{"api_key": KEY_NAME}], usage


def test_top_once_shows_every_deployment_from_the_metrics_endpoint(scraped, deployment, key):
    done = threading.Event()

    def busy() -> None:
        while not done.is_set():
            chat(deployment, key, max_tokens=16)
            deployment.openai(key).embeddings.create(model=EMB, input=["the sea"])

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        out = subprocess.run(CLI + ["top", "--once", "--interval", "3", "--state-dir", str(deployment.state)],
                             check=False, capture_output=True, text=True, timeout=60)
    finally:
        done.set()
        worker.join()
    assert out.returncode == 0, out.stderr
    rows = {cells[0]: cells for line in out.stdout.splitlines()
            if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 11}
    assert f"http://127.0.0.1:{deployment.metrics}/metrics" in out.stdout
    llm, emb = rows[LLM], rows[EMB]
    assert llm[1] == "loaded" and emb[1] == "loaded", out.stdout
    assert float(llm[2]) > 0 and float(llm[5]) > 0, out.stdout          # requests/s, tokens/s out
    assert float(emb[2]) > 0 and float(emb[4]) > 0, out.stdout          # its ensemble's requests, tokens in
    assert llm[6] != "-", out.stdout                                       # a TTFT p50 from the window
    assert int(llm[10]) >= 2, out.stdout                                   # the cold starts so far

