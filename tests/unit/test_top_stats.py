"""`serverless-triton top`'s figures from real exposition text: prometheus-client writes the
serverless_triton_* series (as the serve's endpoint does) beside Triton-style nv_* lines, and the
rates, quantiles and rows computed from two scrapes are checked against the traffic that made them."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from builder.cli import main
from builder.cli.top import table
from builder.serve.ports import free_port
from builder.serve.top_stats import histogram_quantile, parse, rows

P = "serverless_triton_"
TRITON_LINES = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="smollm2-135m-instruct-int8",version="1"} 12
"""
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class FakeServe:
    """The metric families part 1 exposes, in a registry of their own (real prometheus-client)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.success = Counter(P + "request_success", "", ["model", "finish_reason"], registry=r)
        self.errors = Counter(P + "request_errors", "", ["model", "reason"], registry=r)
        self.prompt = Counter(P + "prompt_tokens", "", ["model"], registry=r)
        self.generated = Counter(P + "generation_tokens", "", ["model"], registry=r)
        self.embedded = Counter(P + "embedding_tokens", "", ["model"], registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "", ["model"], buckets=BUCKETS, registry=r)
        self.running = Gauge(P + "requests_running", "", ["model"], registry=r)
        self.waiting = Gauge(P + "requests_waiting", "", ["model"], registry=r)
        self.loaded = Gauge(P + "model_loaded", "", ["model"], registry=r)
        self.cold = Counter(P + "cold_starts", "", ["model"], registry=r)

    def text(self) -> str:
        return generate_latest(self.registry).decode() + TRITON_LINES


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = {0.1: 10.0, 0.5: 20.0, 1.0: 20.0, math.inf: 20.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)            # rank 10: top of the first bucket
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.1 + 0.4 * 9 / 10)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)          # first bucket starts at 0
    # a rank in the +Inf bucket: the highest finite bound is all a histogram knows
    assert histogram_quantile(0.99, {0.1: 1.0, math.inf: 10.0}) == pytest.approx(0.1)
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None       # nothing observed
    assert histogram_quantile(0.5, {}) is None


def test_rows_give_rates_and_window_quantiles_from_two_scrapes():
    serve, m, e = FakeServe(), "smollm2-135m-instruct:int8", "all-minilm-l6-v2:int8"
    serve.loaded.labels(m).set(1)
    serve.loaded.labels(e).set(0)
    serve.success.labels(m, "stop").inc(3)
    serve.ttft.labels(m).observe(2.0)            # before the window: must not count in its quantiles
    before = parse(serve.text(), at=100.0)

    serve.success.labels(m, "stop").inc(6)
    serve.success.labels(m, "length").inc(2)
    serve.errors.labels(m, "client error").inc(2)
    serve.prompt.labels(m).inc(400)
    serve.generated.labels(m).inc(1000)
    serve.embedded.labels(e).inc(60)
    for v in (0.07,) * 5 + (0.3,) * 5:
        serve.ttft.labels(m).observe(v)
    serve.running.labels(m).set(3)
    serve.waiting.labels(m).set(1)
    serve.cold.labels(e).inc()
    after = parse(serve.text(), at=102.0)

    llm, emb = {r.model: r for r in rows(before, after)}[m], {r.model: r for r in rows(before, after)}[e]
    assert llm.loaded is True and emb.loaded is False
    assert llm.requests_per_s == pytest.approx((6 + 2 + 2) / 2) and llm.errors_per_s == pytest.approx(1)
    assert llm.prompt_tokens_per_s == pytest.approx(200) and llm.generation_tokens_per_s == pytest.approx(500)
    assert emb.prompt_tokens_per_s == pytest.approx(30) and emb.requests_per_s == 0
    assert llm.ttft_p50 == pytest.approx(0.1)                    # 5 of 10 in (0.05, 0.1]
    assert llm.ttft_p95 == pytest.approx(0.25 + 0.25 * 4.5 / 5)  # rank 9.5 in (0.25, 0.5]
    assert emb.ttft_p50 is None                                  # no request finished in the window
    assert (llm.running, llm.waiting, emb.cold_starts) == (3, 1, 1)
    assert [r.model for r in rows(before, after)] == sorted([m, e])   # nv_* series make no rows


def test_a_restarted_serve_counts_from_zero_instead_of_going_negative():
    old, new = FakeServe(), FakeServe()
    old.generated.labels("m:int8").inc(5000)
    new.generated.labels("m:int8").inc(40)
    (row,) = rows(parse(old.text(), at=0.0), parse(new.text(), at=1.0))
    assert row.generation_tokens_per_s == pytest.approx(40)


def test_the_table_shows_every_figure():
    serve = FakeServe()
    serve.loaded.labels("m:int8").set(1)
    serve.ttft.labels("m:int8").observe(0.07)
    serve.success.labels("m:int8", "stop").inc()
    (row,) = rows(parse(FakeServe().text(), at=0.0), parse(serve.text(), at=1.0))
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table([row], "http://127.0.0.1:8002/metrics", 1.0))
    text = console.export_text()
    assert "m:int8" in text and "loaded" in text and "1.00" in text and "75 ms" in text


def test_an_unreachable_endpoint_is_one_line():
    url = f"http://127.0.0.1:{free_port()}/metrics"
    result = CliRunner().invoke(main, ["top", "--once", "--metrics-url", url])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: cannot reach the metrics endpoint {url}") and \
        result.output.count("\n") == 1


def test_a_serve_without_state_says_where_it_looked(tmp_path):
    result = CliRunner().invoke(main, ["top", "--once", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no deployment state in" in result.output and "--state-dir" in result.output


def test_embedding_requests_are_their_ensembles_triton_requests():
    """Embeddings count texts, not requests: top reads Triton's count of the deployment's ensemble
    (as serve's endpoint labels it), never that of its tokenize/encoder/pooling models."""
    def text(ensemble: int, encoder: int, failed: int) -> str:
        return (FakeServe().text() +
                "# HELP nv_inference_request_success Number of successful inference requests\n"
                "# TYPE nv_inference_request_success counter\n"
                f'nv_inference_request_success{{model="emb:int8",triton_model="emb-int8",version="1"}} {ensemble}\n'
                f'nv_inference_request_success{{model="emb:int8",triton_model="emb-int8-encoder",version="1"}} '
                f"{encoder}\n"
                "# HELP nv_inference_request_failure Number of failed inference requests\n"
                "# TYPE nv_inference_request_failure counter\n"
                f'nv_inference_request_failure{{model="emb:int8",triton_model="emb-int8",version="1"}} {failed}\n'
                f'serverless_triton_model_loaded{{model="emb:int8"}} 1\n').replace(TRITON_LINES, "")

    (row,) = rows(parse(text(10, 40, 1), at=0.0), parse(text(16, 90, 3), at=2.0))
    assert row.model == "emb:int8" and row.requests_per_s == pytest.approx((6 + 2) / 2)
