"""Decode throughput of the CPU LLM engines with the runtime settings chosen per host
(backends/cpu_runtime.py) against the old forced ones (f32 compute, f32 KV cache reserved for
max_batch_size full contexts), same run, rounds interleaved, medians reported (issue 18).

In-process: fp16, int8, fp8 at 1 and 8 sequences, and int8 with the chosen settings at 16 and 32.
Through Triton (HTTP, one request per client): int8 at 1 and 8 clients, two servers side by side,
one of them serving a copy of the repository whose settings file pins the old setting.
Run: .venv/bin/python -m pytest benchmarks/bench_cpu_runtime.py --benchmark-only -s
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backends.contract.naming import DeploymentName
from backends.cpu_isa import host_isa_class
from backends.cpu_runtime import SETTINGS_FILE
from backends.llm_engine import ContinuousBatchingEngine, GenerationRequest, kv_cache_gib
from backends.sampling import Sampling
from backends.tokenization import ModelTokenizer
from builder.paths import cache_root
from builder.serve.ports import free_ports
from tests.support.llm_client import http_infer
from tests.support.machine import cpu_description

NAME = "smollm2-135m-instruct"
CONTEXT = 1024
MAX_BATCH = 32
NEW_TOKENS = 128
ROUNDS = 3
OLD = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}   # what every engine ran before
PROMPTS = [f"<|im_start|>user\nWrite a long, detailed story about {topic} number {i}.<|im_end|>\n"
           f"<|im_start|>assistant\n" for i in range(4)
           for topic in ("a lighthouse keeper", "a dragon who loves tea", "a lost robot", "the first city on Mars",
                         "a jazz musician", "a cat detective", "an old oak tree", "a time-travelling baker")]
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    from builder.build.deployment import DeploymentSpec
    from builder.build.pipeline import BuildOptions, build

    out = tmp_path_factory.mktemp("bench-cpu-runtime") / "repo"
    build([DeploymentSpec(NAME, precisions=["fp16", "int8", "fp8"], context_size=CONTEXT, max_batch_size=MAX_BATCH)],
          BuildOptions(output=out, cache_dir=cache_root(), echo=lambda _: None))
    return out


def engine_dir(repository: Path, precision: str) -> Path:
    return repository / DeploymentName(NAME, precision).llm_engine / "1" / "engine"


def decode(engine: ContinuousBatchingEngine, prompts: list[list[int]]) -> float:
    """Tokens per second for these prompts submitted together, NEW_TOKENS each (no early stop)."""
    done = threading.Semaphore(0)
    counts = []

    def on_tokens(ids, final, _reason):
        if final:
            counts.append(len(ids))
            done.release()

    t0 = time.perf_counter()
    for ids in prompts:
        engine.submit(GenerationRequest(ids, NEW_TOKENS, -1, Sampling(), on_tokens))
    for _ in prompts:
        done.acquire()
    return sum(counts) / (time.perf_counter() - t0)


def _median_of_interleaved(benchmark, runs: dict[str, callable]) -> dict[str, float]:
    """Each round runs every entry once, in turn; the medians per entry are reported."""
    values: dict[str, list[float]] = {k: [] for k in runs}

    def one_round():
        for key, run in runs.items():
            values[key].append(run())

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    medians = {k: round(statistics.median(v), 1) for k, v in values.items()}
    benchmark.extra_info.update(medians)
    RESULTS.update(medians)
    print(f"\n{cpu_description()}\n" + "\n".join(f"  {k}: {v} tok/s (rounds {values[k]})" for k, v in medians.items()))
    return medians


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8"])
def test_in_process_old_vs_chosen(benchmark, repository, precision):
    path = engine_dir(repository, precision)
    ids = [ModelTokenizer.load(path).encode(p) for p in PROMPTS]
    old = ContinuousBatchingEngine(path, CONTEXT, 8, properties=OLD, cache_gib=kv_cache_gib(path, CONTEXT, 8))
    chosen = ContinuousBatchingEngine(path, CONTEXT, MAX_BATCH)
    RESULTS[f"{precision}_setting"] = chosen.runtime.setting.describe()
    print(f"\n{precision} on {chosen.runtime.isa_class}: {chosen.runtime.setting.describe()}")
    try:
        runs = {f"{precision}_{which}_B{b}": (lambda e=engine, b=b: decode(e, ids[:b]))
                for b in (1, 8) for which, engine in (("old", old), ("chosen", chosen))}
        if precision == "int8":
            runs |= {f"int8_chosen_B{b}": (lambda b=b: decode(chosen, ids[:b])) for b in (16, 32)}
        _median_of_interleaved(benchmark, runs)
    finally:
        old.shutdown()
        chosen.shutdown()


@pytest.fixture(scope="module")
def servers(repository, tmp_path_factory):
    """Two Triton servers: the repository as built, and a copy pinned to the old setting."""
    from builder.serve.triton_server import Ports, TritonServer

    root = tmp_path_factory.mktemp("bench-cpu-runtime-triton")
    old_repo = root / "old"
    shutil.copytree(repository, old_repo, symlinks=True)
    settings = engine_dir(old_repo, "int8") / SETTINGS_FILE
    table = json.loads(settings.read_text())
    table["classes"][host_isa_class()] = {"compute": "f32", "kv_cache": "f32", "dynamic_quantization": 32,
                                          "top1_agreement": 0, "mean_logit_cosine": 0}
    settings.write_text(json.dumps(table))
    dep = DeploymentName(NAME, "int8")
    models = dep.llm_models()
    with TritonServer(repository, Ports(*free_ports(3)), log_path=root / "new.log", load_models=models) as new, \
            TritonServer(old_repo, Ports(*free_ports(3)), log_path=root / "old.log", load_models=models) as old:
        for s in (new, old):
            http_infer(s.http_url, dep.llm, text_input=PROMPTS[0], max_tokens=8)
        yield {"old": old, "chosen": new}


def _clients(server, n: int) -> float:
    def one(prompt):
        return http_infer(server.http_url, DeploymentName(NAME, "int8").llm, text_input=prompt,
                          max_tokens=NEW_TOKENS)["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        tokens = sum(pool.map(one, PROMPTS[:n]))
    return tokens / (time.perf_counter() - t0)


def test_triton_int8_old_vs_chosen(benchmark, servers):
    _median_of_interleaved(benchmark, {f"triton_int8_{which}_{n}_clients": (lambda s=s, n=n: _clients(s, n))
                                       for n in (1, 8) for which, s in servers.items()})


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not RESULTS:
        return
    out = {"cpu": cpu_description(), "isa_class": host_isa_class(), "rounds": ROUNDS, "new_tokens": NEW_TOKENS,
           **RESULTS}
    for key in [k for k in RESULTS if "_chosen_" in k]:
        old = RESULTS.get(key.replace("_chosen_", "_old_"))
        if old:
            out[key.replace("_chosen_", "_speedup_")] = round(RESULTS[key] / old, 2)
    print("\n" + json.dumps(out, indent=2))
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "cpu_runtime.json").write_text(json.dumps(out, indent=2) + "\n")
