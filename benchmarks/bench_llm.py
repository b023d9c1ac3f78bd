"""Decode throughput of the default model through Triton (int8 CPU engine, in-flight batching)
at 1 and 8 concurrent clients, against transformers' generate (fp32, batch 1) in the same run.

Goals (issue 9): 8 clients >= 4x the 1-client throughput; 1 client >= 3x transformers fp32.
Run: make bench (or .venv/bin/python -m pytest benchmarks/bench_llm.py --benchmark-only -s)
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from builder.paths import cache_root
from builder.serve.ports import free_ports
from tests.support.llm_client import http_infer
from tests.support.machine import cpu_description

NEW_TOKENS = 128
ROUNDS = 3
PROMPTS = [f"<|im_start|>user\nWrite a long, detailed story about {topic}.<|im_end|>\n<|im_start|>assistant\n"
           for topic in ("a lighthouse keeper", "a dragon who loves tea", "a lost robot", "the first city on Mars",
                         "a jazz musician", "a cat detective", "an old oak tree", "a time-travelling baker")]
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from builder.build.deployment import DeploymentSpec
    from builder.build.pipeline import BuildOptions, build
    from builder.serve.triton_server import Ports, TritonServer

    root = tmp_path_factory.mktemp("bench-llm")
    cache = cache_root()
    build([DeploymentSpec("smollm2-135m-instruct", precisions=["int8"], context_size=1024, max_batch_size=8)],
          BuildOptions(output=root / "repo", cache_dir=cache, echo=lambda _: None))
    with TritonServer(root / "repo", Ports(*free_ports(3)), log_path=root / "triton.log") as s:
        http_infer(s.http_url, "smollm2-135m-instruct-int8", text_input=PROMPTS[0], max_tokens=8)  # warm up
        yield s


def _clients(server, n: int) -> float:
    """Tokens per second generated for n concurrent clients, one request each."""
    def one(prompt):
        return http_infer(server.http_url, "smollm2-135m-instruct-int8", text_input=prompt,
                          max_tokens=NEW_TOKENS)["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        tokens = sum(pool.map(one, PROMPTS[:n]))
    return tokens / (time.perf_counter() - t0)


def _transformers_fp32():
    """One greedy run of transformers' generate at fp32, batch 1: a function returning tokens/s."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from builder.build.sources.checkpoint import resolve

    ckpt = resolve("default", "llm", cache_root())
    model = AutoModelForCausalLM.from_pretrained(ckpt.hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([Tokenizer.from_file(str(ckpt.hf_dir / "tokenizer.json")).encode(PROMPTS[0]).ids])

    def run():
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones_like(ids), pad_token_id=2)
            return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)

    return run


def test_triton_int8_vs_transformers_fp32(benchmark, server):
    """Each round runs the peer, 1 client and 8 clients in turn; medians of the rounds are reported,
    so one slow round (the machine is shared) moves no figure and every ratio pairs the same rounds."""
    runs = {"transformers_fp32_1": _transformers_fp32(),
            "triton_int8_1": lambda: _clients(server, 1), "triton_int8_8": lambda: _clients(server, 8)}
    values: dict[str, list[float]] = {k: [] for k in runs}

    def one_round():
        for key, run in runs.items():
            values[key].append(run())

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    for key, v in values.items():
        RESULTS[key] = statistics.median(v)
        benchmark.extra_info[f"{key}_tokens_per_s"] = round(RESULTS[key], 1)
        benchmark.extra_info[f"{key}_rounds"] = [round(x, 1) for x in v]


@pytest.fixture(scope="module", autouse=True)
def report():
    """After the module: print the ratios the goals are stated in, and keep them beside it."""
    yield
    r = RESULTS
    if not {"transformers_fp32_1", "triton_int8_1", "triton_int8_8"} <= r.keys():
        return
    out = {"cpu": cpu_description(), "rounds": ROUNDS, "statistic": "median of interleaved rounds",
           **{k: round(v, 1) for k, v in r.items()},
           "batching_gain_8_vs_1": round(r["triton_int8_8"] / r["triton_int8_1"], 2),
           "speedup_1_client_vs_transformers_fp32": round(r["triton_int8_1"] / r["transformers_fp32_1"], 2)}
    print("\n" + json.dumps(out, indent=2))
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "llm.json").write_text(json.dumps(out, indent=2) + "\n")
