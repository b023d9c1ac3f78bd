"""The figures `serverless-triton top` shows, computed from a serve's Prometheus endpoint (the
serverless_triton_* series, docs/monitoring.md): rates from two scrapes, quantiles from histogram
buckets the way Prometheus's histogram_quantile does, one row per deployment. No terminal here:
the CLI module only renders these rows, so they are unit-tested on real exposition text.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from backends.contract.naming import DeploymentName
from backends.errors import ServeError, UserError
from builder.serve.proxy import StateDir

PREFIX = "serverless_triton_"
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scrape:
    """One read of the endpoint: {sample name: {sorted labels: value}} and when it was taken."""

    at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    def by_model(self, name: str) -> dict[str, float]:
        """A series summed over every label but `model` (e.g. successes of every finish reason)."""
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.samples.get(name, {}).items():
            model = dict(labels).get("model")
            if model is not None:
                out[model] += value
        return dict(out)

    def buckets(self, histogram: str) -> dict[str, dict[float, float]]:
        """{model: {upper bound: cumulative count}} of a histogram, summed over other labels."""
        out: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for labels, value in self.samples.get(histogram + "_bucket", {}).items():
            d = dict(labels)
            if "model" in d and "le" in d:
                out[d["model"]][float(d["le"])] += value
        return {m: dict(b) for m, b in out.items()}

    def ensemble_requests(self, name: str) -> dict[str, float]:
        """Triton's own count `name` (nv_inference_request_success / _failure) of each deployment's
        ensemble, the model its clients call (the serve labels it model=name:precision and
        triton_model=its Triton name)."""
        out: dict[str, float] = defaultdict(float)
        # Triton's counters have no `_total`; prometheus-client's parser adds it to a counter's samples
        series = self.samples.get(name) or self.samples.get(name + "_total", {})
        for labels, value in series.items():
            d = dict(labels)
            try:
                if d.get("triton_model") == DeploymentName.parse(d.get("model", "")).embedding:
                    out[d["model"]] += value
            except UserError:
                continue
        return dict(out)

    def models(self) -> set[str]:
        return {dict(labels)["model"] for name, series in self.samples.items() if name.startswith(PREFIX)
                for labels in series if "model" in dict(labels)}


def parse(text: str, at: float | None = None) -> Scrape:
    """Prometheus text exposition (Triton's nv_* and the project's series alike) into a Scrape."""
    samples: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name][tuple(sorted(s.labels.items()))] = s.value
    return Scrape(time.time() if at is None else at, dict(samples))


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of cumulative bucket counts {le: count}, interpolated linearly inside the
    bucket that holds it (Prometheus's histogram_quantile). None without observations."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower   # the highest finite bound is all a histogram can say
            if le <= 0:
                return le
            return lower + (le - lower) * (rank - below) / (count - below) if count > below else le
        lower, below = le, count
    return lower


def _delta(now: float, before: float | None) -> float:
    """A counter's increase; a smaller value means it restarted (the serve restarted): count from 0."""
    if before is None or now < before:
        return now
    return now - before


def _window(cur: dict[float, float], prev: dict[float, float] | None) -> dict[float, float]:
    return {le: _delta(v, (prev or {}).get(le)) for le, v in cur.items()}


def _ensemble_rate(prev: Scrape, cur: Scrape, name: str, seconds: float) -> dict[str, float]:
    before = prev.ensemble_requests(name)
    return {m: _delta(v, before.get(m)) / seconds for m, v in cur.ensemble_requests(name).items()}


@dataclass(frozen=True)
class DeploymentRow:
    """One deployment's line in `top`. Rates cover the time between the two scrapes; quantiles the
    requests that finished in it (None: none did)."""

    model: str
    loaded: bool | None           # serverless_triton_model_loaded (None: not reported)
    requests_per_s: float         # answered + failed (embeddings: their ensemble's Triton requests)
    errors_per_s: float
    prompt_tokens_per_s: float    # prompt and embedding tokens read
    generation_tokens_per_s: float
    ttft_p50: float | None
    ttft_p95: float | None
    running: float
    waiting: float
    cold_starts: float            # since the serve started


def rows(prev: Scrape, cur: Scrape) -> list[DeploymentRow]:
    """One row per deployment that either scrape reports, sorted by name."""
    seconds = max(cur.at - prev.at, 1e-9)

    def rate(*names: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for name in names:
            before = prev.by_model(name)
            for model, value in cur.by_model(name).items():
                out[model] += _delta(value, before.get(model)) / seconds
        return out

    requests = rate(f"{PREFIX}request_success_total", f"{PREFIX}request_errors_total")
    errors = rate(f"{PREFIX}request_errors_total")
    # embedding deployments count texts and tokens, not requests: their ensemble's requests then
    answered, failed = (_ensemble_rate(prev, cur, f"nv_inference_request_{kind}", seconds)
                        for kind in ("success", "failure"))
    for model in set(answered) - set(cur.by_model(f"{PREFIX}request_success_total")):
        requests[model] = answered[model] + failed.get(model, 0.0)
    prompt = rate(f"{PREFIX}prompt_tokens_total", f"{PREFIX}embedding_tokens_total")
    generated = rate(f"{PREFIX}generation_tokens_total")
    ttft_now, ttft_before = (s.buckets(f"{PREFIX}time_to_first_token_seconds") for s in (cur, prev))
    loaded = cur.by_model(f"{PREFIX}model_loaded")
    running, waiting = cur.by_model(f"{PREFIX}requests_running"), cur.by_model(f"{PREFIX}requests_waiting")
    cold = cur.by_model(f"{PREFIX}cold_starts_total")
    out = []
    for model in sorted(cur.models() | prev.models()):
        window = _window(ttft_now.get(model, {}), ttft_before.get(model))
        out.append(DeploymentRow(
            model=model, loaded=bool(loaded[model]) if model in loaded else None,
            requests_per_s=requests.get(model, 0.0), errors_per_s=errors.get(model, 0.0),
            prompt_tokens_per_s=prompt.get(model, 0.0), generation_tokens_per_s=generated.get(model, 0.0),
            ttft_p50=histogram_quantile(0.5, window), ttft_p95=histogram_quantile(0.95, window),
            running=running.get(model, 0.0), waiting=waiting.get(model, 0.0), cold_starts=cold.get(model, 0.0)))
    return out


# -- finding and reading the endpoint ---------------------------------------------------------

def metrics_url(state: Path) -> str:
    """The metrics endpoint a running serve recorded in its state directory (loopback when it
    listens on every address)."""
    layout = StateDir(Path(state)).read_layout()
    if not layout.metrics:
        raise ServeError(f"the serve of {state} recorded no metrics address (started by an older version): "
                         "restart it, or pass --metrics-url")
    host, port = layout.metrics.rsplit(":", 1)
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
    return f"http://{host}:{port}/metrics"


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    """Read the endpoint once; an unreachable or foreign endpoint is one ServeError line."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        raise ServeError(f"the metrics endpoint {url} answered HTTP {e.code}: is that serve's --metrics-port?") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as e:
        raise ServeError(f"cannot reach the metrics endpoint {url} ({getattr(e, 'reason', e)}): is "
                         "`serverless-triton serve` running with this --http-port / --state-dir / --metrics-url?") \
            from None
    try:
        return parse(text)
    except ValueError as e:
        raise ServeError(f"{url} is not a Prometheus endpoint ({e}): pass serve's metrics URL") from None
