"""The engine side of the Prometheus series (docs/monitoring.md): what the Python models inside
Triton know (tokens, finish reasons, latencies, the engine's batch and KV cache).

The models record them with prometheus-client in its multiprocess mode: every Triton stub process
writes its series to memory-mapped files in `PROMETHEUS_MULTIPROC_DIR` (serve makes one per run
and puts it in Triton's environment), and serve's metrics endpoint adds them up with
`MultiProcessCollector` and merges them with Triton's and the gateway's series
(`builder/serve/metrics_endpoint.py`). An update is a few microseconds in the calling thread, from
any thread, with no message to Triton.

Why not Triton's custom-metrics API (`pb_utils.MetricFamily`), the first version of this module:
on Triton 2.51 it crashed the server (a stub SIGSEGV, then boost::interprocess::lock_exception in
tritonserver) in 5 of 7 runs of 8 concurrent chat requests x 3-8 rounds, with our models sending
counter, gauge and histogram updates from their own threads (the engine's stepping thread, the
per-request threads of the engine-call and stream models); the same traffic with the updates off
ran clean 3 times, and this version ran 8 rounds clean. See docs/monitoring.md.

Every series carries `model` (the user-facing `name:precision`) and `triton_model` (the Triton
model that counted it). Counters survive a model's unload (its files stay; the sums go on);
gauges count only live processes. `SERVERLESS_TRITON_METRICS=off` (`serve --no-metrics`) turns
every update into a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from backends.contract.naming import deployment_of

ENV = "SERVERLESS_TRITON_METRICS"
DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"     # prometheus-client's own switch to its multiprocess mode

# seconds; vLLM's buckets, trimmed to what a CPU engine can show
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
PREFIX = "serverless_triton_"
LABELS = ("model", "triton_model")


@dataclass(frozen=True)
class Spec:
    description: str
    kind: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


SPECS: dict[str, Spec] = {
    "prompt_tokens": Spec("Prompt tokens of answered requests (the usage clients received)", COUNTER),
    "generation_tokens": Spec("Generated tokens of answered requests (the usage clients received)", COUNTER),
    "request_success": Spec("Requests answered in full, by finish_reason", COUNTER, ("finish_reason",)),
    "request_errors": Spec("Requests that failed, by reason (engine error, cancelled: engine; client error: "
                           "gateway)", COUNTER, ("reason",)),
    "time_to_first_token_seconds": Spec("From the engine receiving a request to its first token", HISTOGRAM,
                                        buckets=LATENCY_BUCKETS),
    "time_per_output_token_seconds": Spec("Mean time between output tokens of one request", HISTOGRAM,
                                          buckets=TOKEN_BUCKETS),
    "e2e_request_latency_seconds": Spec("From the engine receiving a request to its last token", HISTOGRAM,
                                        buckets=LATENCY_BUCKETS),
    "queue_time_seconds": Spec("From the engine receiving a request to its joining the running batch", HISTOGRAM,
                               buckets=LATENCY_BUCKETS),
    "requests_running": Spec("Requests in the engine's running batch", GAUGE),
    "requests_waiting": Spec("Requests received by the engine, not yet in its running batch", GAUGE),
    "kv_cache_usage_ratio": Spec("Share of the KV cache in use after the last engine step (0-1)", GAUGE),
    "embedding_texts": Spec("Texts embedded", COUNTER),
    "embedding_tokens": Spec("Tokens of the texts embedded (after truncation, special tokens included)", COUNTER),
}


def enabled() -> bool:
    return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false", "no")


_metrics: dict[str, object] = {}


def _metric(name: str):
    """The prometheus-client metric for `name` (made on first use: serve imports this module for
    ENV alone, without prometheus-client's multiprocess mode)."""
    if name not in _metrics:
        from prometheus_client import Counter, Gauge, Histogram

        spec, full = SPECS[name], PREFIX + name
        labels = (*LABELS, *spec.labels)
        if spec.kind == COUNTER:
            _metrics[name] = Counter(full, spec.description, labels, registry=None)
        elif spec.kind == GAUGE:   # only live stubs count; one engine per deployment: their sum
            _metrics[name] = Gauge(full, spec.description, labels, registry=None, multiprocess_mode="livesum")
        else:
            _metrics[name] = Histogram(full, spec.description, labels, registry=None, buckets=spec.buckets)
    return _metrics[name]


class ModelMetrics:
    """The series one Triton model records; every method is cheap and never raises (a metric must
    not fail a request)."""

    def __init__(self, triton_model: str, on: bool | None = None):
        self.labels = {"model": deployment_of(triton_model) or triton_model, "triton_model": triton_model}
        self.on = enabled() if on is None else on
        self._warned: set[str] = set()

    def _do(self, op: str, name: str, value: float, **labels: str) -> None:
        if not self.on:
            return
        try:
            getattr(_metric(name).labels(**self.labels, **labels), op)(value)
        except Exception as e:  # noqa: BLE001 -- a full disk, a removed directory: log once, go on
            if name not in self._warned:
                self._warned.add(name)
                import logging

                logging.getLogger(__name__).warning("metrics: %s%s not recorded: %r", PREFIX, name, e)

    # -- LLM requests ------------------------------------------------------------------------------
    def answered(self, prompt_tokens: int, generation_tokens: int, finish_reason: str) -> None:
        """One request answered in full, with the usage its client received."""
        self._do("inc", "prompt_tokens", prompt_tokens)
        self._do("inc", "generation_tokens", generation_tokens)
        self._do("inc", "request_success", 1, finish_reason=finish_reason or "stop")

    def failed(self, reason: str) -> None:
        self._do("inc", "request_errors", 1, reason=reason)

    def timed(self, queued: float | None, first_token: float | None, last_token: float | None, tokens: int) -> None:
        """Seconds from the engine receiving a request to its joining the batch, its first and its
        last token (None: never reached)."""
        if queued is not None:
            self._do("observe", "queue_time_seconds", queued)
        if first_token is not None:
            self._do("observe", "time_to_first_token_seconds", first_token)
        if last_token is not None:
            self._do("observe", "e2e_request_latency_seconds", last_token)
            if first_token is not None and tokens > 1:
                self._do("observe", "time_per_output_token_seconds", (last_token - first_token) / (tokens - 1))

    def gauge(self, name: str, value: float) -> None:
        self._do("set", name, value)

    # -- embeddings --------------------------------------------------------------------------------
    def embedded(self, texts: int, tokens: int) -> None:
        self._do("inc", "embedding_texts", texts)
        self._do("inc", "embedding_tokens", tokens)
