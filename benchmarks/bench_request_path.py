"""Where one request's time goes at 1 client (issue 18, scope 3), from HTTP in to last token out.

The default LLM at int8 through one `serve` (nginx, gateway, Triton), the same chat asked three
ways, rounds interleaved, sequential (1 client):
- `triton`: Triton's /v2 generate on its own loopback port (no nginx, no gateway);
- `v2`: the same call through nginx, its key check and the gateway's /v2 relay (what users call);
- `v1`: /v1/chat/completions through nginx and the gateway (OpenAI framing).
Each with 1 new token (the fixed cost: every hop, the ensemble's Python models, prefill) and with
64 (decode). Inside Triton, each model's share comes from its own statistics (queue + compute per
request over the `triton` calls). Models that answer from their own threads (the engine, the
engine call) return from `execute` at once, so Triton's statistics show only their hand-off; the
engine's time is the rest of the `triton` figure.
Medians of the rounds. Run: make bench, or
.venv/bin/python -m pytest benchmarks/bench_request_path.py --benchmark-only -s
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.support.default_llm import MODEL, build_default_int8
from builder.serve.proxy import StateDir
from tests.support.machine import cpu_description
from tests.support.serve import Serve

ENSEMBLE = MODEL.replace(":", "-")
BASE = MODEL.split(":")[0]          # pre/postprocessing are shared by the precisions of one name
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
ROUNDS = 7
PER_ROUND = 5
RESULTS: dict[str, object] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-request-path")
    build_default_int8(root / "repo")
    with Serve(root / "repo", root, "--idle-timeout", "0") as serve:
        yield serve, serve.create_key("bench"), f"http://{StateDir(serve.state).read_layout().triton_http}"


def _call(client: httpx.Client, path: str, url: str, key: str, max_tokens: int) -> float:
    """Seconds for one whole answer (the last token is in the body)."""
    auth = {"Authorization": f"Bearer {key}"}
    t0 = time.perf_counter()
    if path == "v1":
        r = client.post(f"{url}/v1/chat/completions", headers=auth,
                        json={"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0})
    else:
        r = client.post(f"{url}/v2/models/{ENSEMBLE}/generate", headers=auth,
                        json={"messages": json.dumps(MESSAGES), "max_tokens": max_tokens})
    r.raise_for_status()
    return time.perf_counter() - t0


def _model_ns(triton: str) -> dict[str, dict[str, int]]:
    stats = httpx.get(f"{triton}/v2/models/stats", timeout=30).json()["model_stats"]
    out = {}
    for s in stats:
        inference = s["inference_stats"]
        out[s["name"]] = {"count": int(inference["success"]["count"]),
                          "ns": sum(int(inference[k]["ns"]) for k in ("queue", "compute_input", "compute_infer",
                                                                       "compute_output"))}
    return out


@pytest.mark.parametrize("max_tokens", [1, 64])
def test_request_path(benchmark, served, max_tokens):
    serve, key, triton = served
    times: dict[str, list[float]] = {"triton": [], "v2": [], "v1": []}
    per_model: dict[str, list[float]] = {}
    with httpx.Client(timeout=120) as client:
        for path in times:                                       # warm: connections, caches
            _call(client, path, triton if path == "triton" else serve.url, key, max_tokens)

        def one_round():
            for path in times:
                url = triton if path == "triton" else serve.url
                before = _model_ns(triton) if path == "triton" else None
                samples = [_call(client, path, url, key, max_tokens) for _ in range(PER_ROUND)]
                times[path].append(statistics.median(samples) * 1000)
                if before is not None:
                    after = _model_ns(triton)
                    for name, now in after.items():
                        calls = now["count"] - before.get(name, {"count": 0})["count"]
                        if calls > 0 and name.startswith(BASE):
                            spent = now["ns"] - before[name]["ns"]
                            per_model.setdefault(name, []).append(spent / 1e6 / PER_ROUND)

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    medians = {p: round(statistics.median(v), 1) for p, v in times.items()}
    models = {name.removeprefix(BASE).lstrip("-") or "(name)": round(statistics.median(v), 1)
              for name, v in sorted(per_model.items())}
    RESULTS[f"{max_tokens}_tokens"] = {
        "ms": medians,
        "nginx_key_check_and_relay_ms": round(medians["v2"] - medians["triton"], 1),
        "nginx_and_openai_gateway_ms": round(medians["v1"] - medians["triton"], 1),
        "triton_models_ms_per_request": models,
    }
    benchmark.extra_info.update(RESULTS[f"{max_tokens}_tokens"])


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not RESULTS:
        return
    out = {"cpu": cpu_description(), "rounds": ROUNDS, "requests_per_round": PER_ROUND, **RESULTS}
    print("\n" + json.dumps(out, indent=2))
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "request_path.json").write_text(json.dumps(out, indent=2) + "\n")
