"""`:int4` through the whole product: `build-engines --precision int4` of the default model, its
manifest, its agreement with the fp32 reference measured here (tests/support/engine_accuracy.py,
not the builder's code) against the int4 floor, and answers over the OpenAI API from `serve`,
before and after it scaled to zero. Embeddings refuse int4 in one line naming what works."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LLM_NAME

from backends.contract.manifest import read_manifest
from backends.contract.naming import DeploymentName
from backends.contract.precisions import INT4_GROUP_SIZE, PRECISIONS
from backends.cpu_runtime import choose_for_host
from backends.tokenization import ModelTokenizer
from builder.build.engines.openvino_llm import ACCURACY_TEXT
from tests.support.engine_accuracy import measure
from tests.support.serve import CLI, Serve

BUILD = [str(Path(sys.executable).with_name("build-engines"))]      # the console script users run

pytestmark = pytest.mark.slow
MODEL = f"{LLM_NAME}:int4"
IDLE = 3


@pytest.fixture(scope="module")
def int4_repository(tmp_path_factory, build_cache, smollm2) -> Path:
    repo = tmp_path_factory.mktemp("int4") / "repo"
    out = subprocess.run(BUILD + ["--precision", "int4", "--context-size", "512", "--max-batch-size",
                                "4", "--no-memory-test", "-o", str(repo), "--cache-dir", str(build_cache)],
                         check=False, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return repo


def test_manifest_records_int4_and_the_engine_is_smaller_than_int8(int4_repository):
    entry = read_manifest(int4_repository).deployments[MODEL]
    assert entry.precision == "int4" and entry.engine["target"] == "cpu"
    assert f"groups of {INT4_GROUP_SIZE}" in entry.engine["quantization"]
    assert entry.accuracy["reference"] == "fp32"
    assert entry.accuracy["top1_agreement"] >= PRECISIONS["int4"].llm_min_top1
    weights = int4_repository / DeploymentName(LLM_NAME, "int4").llm_engine / "1" / "engine" / "openvino_model.bin"
    # fp32 514 MiB, int8 ~129 MiB: int4 groups with int8 embeddings land near 90 MiB
    assert 60 << 20 < weights.stat().st_size < 110 << 20
    # grouped u4 projections fuse as int8's do (openvino_fusion), kept only with bit-identical logits:
    # where kept, 90 MatMuls fewer (q/k/v three into one, gate/up two into one, in 30 layers)
    rewrites = entry.engine["ir_rewrites"]
    assert rewrites in ("moc+fused", "moc", "none")
    matmuls = (weights.parent / "openvino_model.xml").read_text().count('type="MatMul"')
    assert matmuls == (122 if rewrites == "moc+fused" else 212), (rewrites, matmuls)
    # built with --no-memory-test: an estimate from the weights, no load test's figures
    assert "memory" not in entry.engine and entry.engine["memory_bytes"] > weights.stat().st_size


def test_agreement_with_fp32_is_measured_here_and_passes_the_floor(int4_repository, build_cache, smollm2):
    engine = int4_repository / DeploymentName(LLM_NAME, "int4").llm_engine / "1" / "engine"
    reference = build_cache / "engines" / f"{smollm2.digest[:24]}-fp32"
    ids = ModelTokenizer.load(smollm2.hf_dir).encode(ACCURACY_TEXT)
    setting = choose_for_host(engine).setting          # what the engine runs with on this host
    got = measure(reference, engine, ids, setting.properties())
    p = PRECISIONS["int4"]
    assert got["top1_agreement"] >= p.llm_min_top1, got
    assert got["mean_logit_cosine"] >= p.llm_min_cosine, got
    assert got["top1_agreement"] < 1.0          # it is quantized: not the reference under another name
    recorded = read_manifest(int4_repository).deployments[MODEL].accuracy
    assert abs(recorded["top1_agreement"] - measure(reference, engine, ids, {
        "INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}, len(ids))["top1_agreement"]) < 0.01


def _status(serve: Serve) -> str:
    out = subprocess.run(CLI + ["status", "--json", "--state-dir", str(serve.state)], check=False, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return {d["model"]: d for d in json.loads(out.stdout)["deployments"]}[MODEL]["state"]


def test_served_over_the_openai_api_and_scaled_to_zero(int4_repository, tmp_path):
    with Serve(int4_repository, tmp_path, "--public", "--idle-timeout", str(IDLE)) as serve:
        client = serve.openai("unused")
        assert MODEL in {m.id for m in client.models.list().data}
        answer = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0,
                                                messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in answer.choices[0].message.content and answer.usage.completion_tokens > 0
        deadline = time.monotonic() + 60
        while _status(serve) != "unloaded":
            assert time.monotonic() < deadline, "int4 was not scaled to zero"
            time.sleep(0.5)
        again = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert again.choices[0].text.strip() and _status(serve) == "loaded"


def test_embeddings_refuse_int4_in_one_line(tmp_path):
    out = subprocess.run(BUILD + ["--kind", "embedding", "--precision", "int4", "-o", str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    line = (out.stderr + out.stdout).strip()
    assert len(line.splitlines()) == 1 and "int4 is for LLMs only" in line
    assert "fp32, fp16, int8, fp8" in line
