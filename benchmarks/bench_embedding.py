"""Embedding throughput (sentences/s) of the default model through Triton at 8 concurrent clients,
per precision, against sentence-transformers fp32 in-process (batch 32) on the same machine, model
and sentences, in the same run. Each client sends requests of 16 texts over its own connection.

Goal (issue 10): int8 through Triton >= 3x sentence-transformers fp32. Nothing is asserted.
Run: .venv/bin/python -m pytest benchmarks/bench_embedding.py --benchmark-only -q -s
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from builder.paths import cache_root
from builder.serve.ports import free_ports
from tests.support.machine import cpu_description
from tests.support.texts import varied_sentences

NAME = "all-minilm-l6-v2"
PRECISIONS = ["fp32", "fp16", "int8", "fp8"]
CLIENTS = 8
TEXTS_PER_REQUEST = 16
ROUNDS = 5                                  # medians of 5: this shared machine drifts +-15%
SENTENCES = varied_sentences() * 2          # ~600 texts: prose, other scripts, emoji, code, 256-token texts
RESULTS: dict[str, float] = {}
PAIRED: dict[str, float] = {}               # precision -> sentence-transformers rate in the same test


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    from builder.build.sources.checkpoint import default_embedding_dir

    model = SentenceTransformer(str(default_embedding_dir()), device="cpu")
    model.encode(SENTENCES[:64], batch_size=32)  # warm up
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from builder.build.deployment import DeploymentSpec
    from builder.build.pipeline import BuildOptions, build
    from builder.serve.triton_server import Ports, TritonServer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("bench-embedding")
    cache = cache_root()          # the fp32 export is reused across runs
    build([DeploymentSpec(NAME, kind="embedding", precisions=PRECISIONS, max_batch_size=64)],
          BuildOptions(output=root / "repo", cache_dir=cache, echo=lambda _: None))
    with TritonServer(root / "repo", Ports(*free_ports(3)), log_path=root / "triton.log") as s:
        yield s


def _through_triton(url: str, model: str) -> int:
    import tritonclient.http as httpclient

    local = threading.local()
    requests = [SENTENCES[i:i + TEXTS_PER_REQUEST] for i in range(0, len(SENTENCES), TEXTS_PER_REQUEST)]

    def one(texts):
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(url)
        data = np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1)
        text = httpclient.InferInput("text", list(data.shape), "BYTES")
        text.set_data_from_numpy(data)
        # Binary output, as builder.serve.embedding_client asks for it: JSON floats cost both ends CPU.
        result = local.client.infer(model, [text], outputs=[httpclient.InferRequestedOutput("embedding")])
        return result.as_numpy("embedding").shape[0]

    with ThreadPoolExecutor(CLIENTS) as pool:
        return sum(pool.map(one, requests))


def test_sentence_transformers_fp32(benchmark, st_model):
    benchmark.pedantic(lambda: st_model.encode(SENTENCES, batch_size=32), rounds=ROUNDS, iterations=1)
    RESULTS["sentence-transformers fp32"] = len(SENTENCES) / benchmark.stats.stats.median
    benchmark.extra_info["sentences_per_s"] = round(RESULTS["sentence-transformers fp32"], 1)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_triton(benchmark, server, st_model, precision):
    """Timed: rounds through Triton. Between them (untimed setup), a sentence-transformers round,
    so the ratio compares the two under the same machine load (this shared box drifts +-15%)."""
    model = f"{NAME}-{precision}"
    _through_triton(server.http_url, model)  # warm up: every shape class compiled once
    peer: list[float] = []

    def peer_round() -> None:
        start = time.perf_counter()
        st_model.encode(SENTENCES, batch_size=32)
        peer.append(time.perf_counter() - start)

    benchmark.pedantic(lambda: _through_triton(server.http_url, model), setup=peer_round, rounds=ROUNDS, iterations=1)
    RESULTS[f"triton {precision}"] = len(SENTENCES) / benchmark.stats.stats.median
    PAIRED[precision] = len(SENTENCES) / float(np.median(peer))
    benchmark.extra_info["sentences_per_s"] = round(RESULTS[f"triton {precision}"], 1)
    benchmark.extra_info["sentence_transformers_interleaved_per_s"] = round(PAIRED[precision], 1)
    benchmark.extra_info["ratio_interleaved"] = round(RESULTS[f"triton {precision}"] / PAIRED[precision], 2)


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Prints the table at the end (run with -s); ratios are against sentence-transformers fp32."""
    yield
    base = RESULTS.get("sentence-transformers fp32")
    print(f"\n{len(SENTENCES)} texts, {CLIENTS} clients x {TEXTS_PER_REQUEST} texts/request, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, CPU: {cpu_description()}")
    for name, rate in RESULTS.items():
        ratio = f"{rate / base:.2f}x" if base else ""
        precision = name.split()[-1]
        paired = (f"  (interleaved sentence-transformers {PAIRED[precision]:.1f}/s: {rate / PAIRED[precision]:.2f}x)"
                  if name.startswith("triton") and precision in PAIRED else "")
        print(f"  {name:<28} {rate:8.1f} sentences/s  {ratio}{paired}")
