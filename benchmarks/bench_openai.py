"""What the OpenAI API costs: tokens/s through /v1/chat/completions against Triton's own
/v2/models/<m>/generate (same messages, same chat template, same engine) at 1 and 8 clients, and
time to first token through /v1 (stream) against /v2 generate_stream. Both paths go through the
same `serve` (nginx with API keys on: /v1 via the gateway; /v2 generate via nginx's key check and
the gateway's relay, /v2 generate_stream via nginx's key check straight to Triton), in the same
run, rounds interleaved; figures are medians of the rounds. The throughput pair thus compares the
OpenAI framing against Triton's own API over the same hops; bench_request_path.py measures each
hop against Triton's own port.

Goals (issue 15): under 5% throughput loss at 8 clients, under 10 ms added to time to first token.
Run: make bench (or .venv/bin/python -m pytest benchmarks/bench_openai.py --benchmark-only -s)
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from benchmarks.support.default_llm import MODEL, NEW_TOKENS, build_default_int8, chat_tokens
from tests.support.machine import cpu_description
from tests.support.serve import Serve

TRITON_MODEL = "smollm2-135m-instruct-int8"
ROUNDS = 3
TTFT_ROUNDS = 20
TOPICS = ("a lighthouse keeper", "a dragon who loves tea", "a lost robot", "the first city on Mars",
          "a jazz musician", "a cat detective", "an old oak tree", "a time-travelling baker")
MESSAGES = [[{"role": "user", "content": f"Write a long, detailed story about {t}."}] for t in TOPICS]
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The default model at int8, served as users serve it, and a key."""
    root = tmp_path_factory.mktemp("bench-openai")
    build_default_int8(root / "repo")
    with Serve(root / "repo", root) as serve:
        yield serve, serve.create_key("bench")


def _v2(serve: Serve, key: str, messages, client: httpx.Client) -> int:
    r = client.post(f"{serve.url}/v2/models/{TRITON_MODEL}/generate", headers={"Authorization": f"Bearer {key}"},
                    json={"messages": json.dumps(messages), "max_tokens": NEW_TOKENS})
    r.raise_for_status()
    return r.json()["completion_tokens"]


def _tokens_per_s(serve: Serve, key: str, call, n: int) -> float:
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=n)) as client:
        call(serve, key, MESSAGES[0], client)   # warm: connections, caches
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            tokens = sum(pool.map(lambda m: call(serve, key, m, client), MESSAGES[:n]))
        return tokens / (time.perf_counter() - t0)


def _first_token_ms(url: str, body: dict, key: str, client: httpx.Client) -> float:
    t0 = time.perf_counter()
    with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            text = event.get("text_output") or "".join(c["delta"].get("content") or "" for c in event.get("choices", []))
            if text:
                return (time.perf_counter() - t0) * 1000
    raise AssertionError(f"no token from {url}")


@pytest.mark.parametrize("clients", [1, 8])
def test_tokens_per_s(benchmark, served, clients):
    """/v1 and /v2 rounds alternate, so both see the same machine load; medians are compared."""
    serve, key = served
    rounds: dict[str, list[float]] = {"v1": [], "v2": []}

    def one_pair():
        for path, call in (("v2", _v2), ("v1", chat_tokens)):
            rounds[path].append(_tokens_per_s(serve, key, call, clients))

    benchmark.pedantic(one_pair, rounds=ROUNDS, iterations=1)
    for path, values in rounds.items():
        RESULTS[f"{path}_tokens_per_s_{clients}"] = statistics.median(values)
    benchmark.extra_info.update({f"{p}_tokens_per_s": statistics.median(v) for p, v in rounds.items()})


def test_time_to_first_token(benchmark, served):
    serve, key = served
    v1_body = {"model": MODEL, "messages": MESSAGES[0], "max_tokens": 16, "temperature": 0, "stream": True}
    v2_body = {"messages": json.dumps(MESSAGES[0]), "max_tokens": 16}
    times: dict[str, list[float]] = {"v1": [], "v2": []}
    with httpx.Client(timeout=60) as client:
        _first_token_ms(f"{serve.url}/v1/chat/completions", v1_body, key, client)   # warm
        _first_token_ms(f"{serve.url}/v2/models/{TRITON_MODEL}-stream/generate_stream", v2_body, key, client)

        def one_pair():
            times["v2"].append(_first_token_ms(f"{serve.url}/v2/models/{TRITON_MODEL}-stream/generate_stream",
                                               v2_body, key, client))
            times["v1"].append(_first_token_ms(f"{serve.url}/v1/chat/completions", v1_body, key, client))

        benchmark.pedantic(one_pair, rounds=TTFT_ROUNDS, iterations=1)
    RESULTS["v1_ttft_ms"], RESULTS["v2_ttft_ms"] = statistics.median(times["v1"]), statistics.median(times["v2"])
    benchmark.extra_info.update(v1_ttft_ms=RESULTS["v1_ttft_ms"], v2_ttft_ms=RESULTS["v2_ttft_ms"])


@pytest.fixture(scope="module", autouse=True)
def report():
    """After the module: the loss and the added latency the goals are stated in, with the CPU."""
    yield
    r = RESULTS
    if not {"v1_tokens_per_s_8", "v2_tokens_per_s_8", "v1_ttft_ms", "v2_ttft_ms"} <= r.keys():
        return
    out = {"cpu": cpu_description(), **{k: round(v, 1) for k, v in r.items()},
           "loss_1_client_pct": round(100 * (1 - r["v1_tokens_per_s_1"] / r["v2_tokens_per_s_1"]), 1),
           "loss_8_clients_pct": round(100 * (1 - r["v1_tokens_per_s_8"] / r["v2_tokens_per_s_8"]), 1),
           "added_ttft_ms": round(r["v1_ttft_ms"] - r["v2_ttft_ms"], 1)}
    print("\n" + json.dumps(out, indent=2))
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "openai.json").write_text(json.dumps(out, indent=2) + "\n")
