"""Scale to zero: the cold start of the default deployments through `serve` (nginx, the gateway,
Triton), and the resident memory of the serving process tree.

Cold start = from a request for an unloaded deployment to its first streamed token (LLM, through
/v1/chat/completions with stream) or to its answer (embeddings, /v1/embeddings): median and p95 of
ROUNDS, each split into the load time of every Triton model of the deployment (the gateway loads
the Python models in parallel, then the ensemble) and the rest (the first request itself); and the
median of the request right after each cold one (the second after a wake).
Memory: RSS of serve and every process under it, with everything unloaded, loaded, and unloaded again.

Goals (issue 16): LLM int8 median under 1 s, embeddings under 0.5 s.
Run: make bench (or .venv/bin/python -m pytest benchmarks/bench_cold_start.py --benchmark-only -s)
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import httpx
import pytest

from backends.errors import InvalidArgumentError
from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.paths import cache_root
from builder.serve.control import act, deployment_states
from builder.serve.processes import children
from tests.support.machine import cpu_description
from tests.support.serve import Serve

LLM, EMB = "smollm2-135m-instruct:int8", "all-minilm-l6-v2:int8"
ROUNDS = 5
RESULTS: dict[str, object] = {}


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants (shared pages counted once per process)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
        todo += list(children(p))
    return total / 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-cold-start")
    build([DeploymentSpec("smollm2-135m-instruct", precisions=["int8"], context_size=2048),
           DeploymentSpec("all-minilm-l6-v2", kind="embedding", precisions=["int8"])],
          BuildOptions(output=root / "repo", cache_dir=cache_root(), echo=lambda _: None))
    with Serve(root / "repo", root, "--public", "--idle-timeout", "0") as serve:
        yield serve


def _first_token_s(serve: Serve) -> float:
    """Seconds to the first streamed token; the stream is read to its end, as a client does (closed
    early, the engine would never complete an answer, and what it does after one would go unseen)."""
    body = {"model": LLM, "messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    t0, first = time.perf_counter(), None
    with httpx.stream("POST", f"{serve.url}/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"] and \
                    json.loads(line[6:])["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    if first is None:
        raise AssertionError("no token")
    return first


def _embedding_s(serve: Serve) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{serve.url}/v1/embeddings", json={"model": EMB, "input": ["a short text"]}, timeout=300)
    r.raise_for_status()
    return time.perf_counter() - t0


def _unload(serve: Serve, model: str, limit: float = 30.0) -> None:
    """Unload once the previous round's request has left: a stream the client closed is still in
    flight for a moment, and the gateway refuses to unload a busy deployment (409)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            act(serve.state, model, "unload")
            return
        except InvalidArgumentError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _cold(serve: Serve, model: str, request) -> dict:
    """Each round: unload, then the first request (the cold start) and the one right after it (the
    first that finds the deployment loaded: what else a burst after a wake waits for)."""
    times, second_requests, parts = [], [], []
    for _ in range(ROUNDS):
        _unload(serve, model)
        times.append(request(serve))
        second_requests.append(request(serve))
        parts.append(next(d for d in deployment_states(serve.state) if d["model"] == model)["load_seconds"])
    ordered = sorted(times)
    return {"median_s": round(statistics.median(times), 3), "p95_s": round(ordered[-1], 3),
            "rounds": [round(t, 3) for t in times],
            "second_request_median_s": round(statistics.median(second_requests), 3),
            "load_s_per_model": {m: round(statistics.median(p[m] for p in parts), 3) for m in parts[0]}}


def test_llm_cold_start(benchmark, served):
    RESULTS["llm"] = benchmark.pedantic(_cold, args=(served, LLM, _first_token_s), rounds=1, iterations=1)
    RESULTS["llm_warm_first_token_s"] = round(statistics.median(_first_token_s(served) for _ in range(5)), 3)


def test_embedding_cold_start(benchmark, served):
    RESULTS["embedding"] = benchmark.pedantic(_cold, args=(served, EMB, _embedding_s), rounds=1, iterations=1)
    RESULTS["embedding_warm_s"] = round(statistics.median(_embedding_s(served) for _ in range(5)), 3)


def test_memory_loaded_and_unloaded(benchmark, served):
    def measure() -> dict:
        pid = served.process.pid
        for model in (LLM, EMB):
            act(served.state, model, "wake")
        _first_token_s(served), _embedding_s(served)
        loaded = tree_rss_mib(pid)
        for model in (LLM, EMB):
            _unload(served, model)
        time.sleep(2)
        return {"loaded": round(loaded), "all_unloaded": round(tree_rss_mib(pid))}

    RESULTS["memory_mib"] = benchmark.pedantic(measure, rounds=1, iterations=1)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if RESULTS:     # also a part run alone (-k embedding)
        out = {"cpu": cpu_description(), **RESULTS}
        print("\n" + json.dumps(out, indent=2))
        if "llm" not in RESULTS or "embedding" not in RESULTS:
            return
        (Path(__file__).parent / "results").mkdir(exist_ok=True)
        (Path(__file__).parent / "results" / "cold_start.json").write_text(json.dumps(out, indent=2) + "\n")
