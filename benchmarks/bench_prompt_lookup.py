"""Prompt-lookup decoding (issue 18): the same int8 engine built with and without `prompt_lookup`,
served side by side by one `serverless-triton serve`, on answers that copy their prompt (a text
to repeat, a text to correct or edit: what summaries, RAG quotes and code edits do) and on answers
that do not (stories), at 1 and 8 clients; the peer is llama.cpp's `llama-server` (Q8_0, plain
decoding) on the copying prompts. All over HTTP `/v1/completions`, greedy, rounds interleaved,
medians. Also checks that both of our deployments give the same greedy text.

Run: .venv/bin/python -m pytest benchmarks/bench_prompt_lookup.py --benchmark-only -s
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from benchmarks.bench_llamacpp import LOAD_PROMPTS, chat, llama_server
from benchmarks.support import llamacpp
from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.paths import cache_root
from tests.support.machine import cpu_description
from tests.support.serve import Serve

NAME = "smollm2-135m-instruct"
LOOKUP = "smollm2-135m-instruct-lookup"
NEW_TOKENS = 160
ROUNDS = int(os.environ.get("BENCH_LOOKUP_ROUNDS", "3"))
PASSAGES = (
    "The server keeps every model in a folder of its own. Each folder holds a configuration file and "
    "one folder per version, and the server loads the newest version unless it is told otherwise.",
    "To make bread, mix flour, water, salt and yeast into a dough, knead it for ten minutes, let it rise "
    "for an hour, shape it into a loaf, let it rise again and bake it in a hot oven for forty minutes.",
    "def read_config(path):\n    with open(path) as f:\n        data = json.load(f)\n    if 'name' not in data:\n"
    "        raise ValueError('the config has no name')\n    return data\n",
    "The lighthouse stood on the rock for two hundred years. Its keeper climbed the stairs every evening, "
    "lit the lamp and watched the ships pass until the sun came up again over the grey sea.",
)
COPYING = ([chat(f"Repeat the following text exactly, word for word:\n\n{p}") for p in PASSAGES]
           + [chat(f"Correct any mistakes in the following text and return all of it:\n\n{p}") for p in PASSAGES])
STORIES = LOAD_PROMPTS[:8]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repo = cache_root() / "bench" / "prompt-lookup-repo"      # kept: later runs find it up to date
    build([DeploymentSpec(NAME, precisions=["int8"], context_size=1024, max_batch_size=8),
           DeploymentSpec(LOOKUP, precisions=["int8"], context_size=1024, max_batch_size=8, prompt_lookup=True)],
          BuildOptions(output=repo, cache_dir=cache_root(), echo=lambda _: None))
    with Serve(repo, tmp_path_factory.mktemp("bench-lookup"), "--idle-timeout", "0") as serve:
        yield serve, serve.create_key("bench")


def complete(client: httpx.Client, url: str, model: str, prompt: str, key: str | None) -> tuple[str, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    if key is None:                       # llama-server: greedy and no reuse of a cached prompt
        body.update(top_k=1, cache_prompt=False)
    r = client.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"} if key else {})
    r.raise_for_status()
    out = r.json()
    return out["choices"][0]["text"], out["usage"]["completion_tokens"]


def rate(url: str, model: str, prompts: list[str], clients: int, key: str | None = None) -> float:
    """Tokens/s over all `prompts`, `clients` at a time."""
    with httpx.Client(timeout=900, limits=httpx.Limits(max_connections=clients)) as client:
        complete(client, url, model, prompts[0], key)          # warm
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(n for _, n in pool.map(lambda p: complete(client, url, model, p, key), prompts))
        return tokens / (time.perf_counter() - t0)


def test_prompt_lookup(benchmark, served):
    serve, key = served
    version, ggufs = llamacpp.ensure()
    print(f"\nCPU: {cpu_description()}; llama.cpp {version}")
    with httpx.Client(timeout=900) as client:
        same = sum(complete(client, serve.url, f"{NAME}:int8", p, key)[0]
                   == complete(client, serve.url, f"{LOOKUP}:int8", p, key)[0] for p in COPYING + STORIES)
    runs: dict[str, list[float]] = {}
    work = {"copying": COPYING, "stories": STORIES}

    def one_round():
        for clients in (1, 8):
            for kind, prompts in work.items():
                use = prompts[:4] if clients == 1 else prompts
                for label, model in (("plain", NAME), ("lookup", LOOKUP)):
                    runs.setdefault(f"ours {label} {kind} x{clients}", []).append(
                        rate(serve.url, f"{model}:int8", use, clients, key))
            with llama_server(version, ggufs["Q8_0"], clients) as url:
                runs.setdefault(f"llama.cpp Q8_0 copying x{clients}", []).append(
                    rate(url, "peer", COPYING[:4] if clients == 1 else COPYING, clients))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    median = {k: round(statistics.median(v), 1) for k, v in runs.items()}
    ratios = {}
    for c in (1, 8):
        ratios[f"lookup / plain, copying x{c}"] = round(median[f"ours lookup copying x{c}"] / median[f"ours plain copying x{c}"], 2)
        ratios[f"lookup / plain, stories x{c}"] = round(median[f"ours lookup stories x{c}"] / median[f"ours plain stories x{c}"], 2)
        ratios[f"lookup / llama.cpp Q8_0, copying x{c}"] = round(
            median[f"ours lookup copying x{c}"] / median[f"llama.cpp Q8_0 copying x{c}"], 2)
    result = {"tokens_per_s": median, "ratios": ratios, "same_greedy_text": f"{same}/{len(COPYING + STORIES)}",
              "cpu": cpu_description(), "llama_cpp": version, "rounds": ROUNDS, "load": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"tokens/s (median of {ROUNDS} interleaved rounds):")
    for k, v in median.items():
        print(f"  {k:36s} {v:8.1f}")
    print("ratios:", json.dumps(ratios))
    print("same greedy text with and without prompt lookup:", result["same_greedy_text"])
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "prompt_lookup.json").write_text(json.dumps(result, indent=1) + "\n")
    assert same >= 1
