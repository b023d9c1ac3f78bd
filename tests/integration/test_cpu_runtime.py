"""Per-host runtime settings and memory of the CPU LLM engines (issue 18), and quantization checks
that can fail (issue 20): the recorded accuracy is measured again here with the tests' own code, on
this host's ISA class and under an AVX2 cap; a genuinely degraded engine is refused by the real
floors; the engine in Triton says which setting it runs; its memory is the manifest's."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import LLM_NAME

from backends.contract.manifest import read_manifest
from backends.contract.naming import DeploymentName
from backends.contract.precisions import PRECISIONS
from backends.cpu_isa import ONEDNN_CAP, host_isa_class
from backends.cpu_runtime import SETTINGS_FILE, RuntimeSetting, candidates
from backends.errors import BuildError
from backends.tokenization import ModelTokenizer
from builder.serve.gateway.memory import stub_rss_bytes
from tests.support.llm_client import engine_ids
from tests.support.python_json import python_json

pytestmark = pytest.mark.slow
QUANTIZED = ["fp16", "int8", "fp8"]


def engine_dir(repository: Path, precision: str) -> Path:
    return repository / DeploymentName(LLM_NAME, precision).llm_engine / "1" / "engine"


def accuracy_ids(repository: Path) -> list[int]:
    from builder.build.engines.openvino_llm import ACCURACY_TEXT

    return ModelTokenizer.load(engine_dir(repository, "fp32")).encode(ACCURACY_TEXT)


def run_capped(cap: str | None, module: str, job: dict) -> dict:
    """Run a module (JSON in, JSON out) in a process whose oneDNN kernels are capped to `cap`."""
    return python_json("-m", module, stdin=json.dumps(job), env={"ONEDNN_MAX_CPU_ISA": cap} if cap else None,
                       timeout=600)


@pytest.mark.parametrize("precision", QUANTIZED)
def test_recorded_settings_pass_the_floors_when_measured_again(llm_repository, precision):
    """For this host's class and for AVX2: the setting the build recorded, measured again by the
    test's own code, meets the precision's floors (from the contract, not from the manifest) and
    reproduces the recorded figures."""
    table = json.loads((engine_dir(llm_repository, precision) / SETTINGS_FILE).read_text())
    ids = accuracy_ids(llm_repository)
    p = PRECISIONS[precision]
    for cls in dict.fromkeys([host_isa_class(), "avx2"]):
        entry = table["classes"][cls]
        setting = RuntimeSetting(entry["compute"], entry["kv_cache"], entry["dynamic_quantization"])
        got = run_capped(ONEDNN_CAP[cls], "tests.support.engine_accuracy",
                         {"reference": str(engine_dir(llm_repository, "fp32")),
                          "engine": str(engine_dir(llm_repository, precision)), "ids": ids,
                          "properties": setting.properties()})
        assert got["top1_agreement"] >= p.llm_min_top1 and got["mean_logit_cosine"] >= p.llm_min_cosine, (cls, got)
        assert got["top1_agreement"] == pytest.approx(entry["top1_agreement"], abs=0.01), (cls, got, entry)
        assert got["mean_logit_cosine"] == pytest.approx(entry["mean_logit_cosine"], abs=5e-4), (cls, got, entry)
    entry = table["classes"][host_isa_class()]   # every faster candidate was tried first, and refused
    chosen = RuntimeSetting(entry["compute"], entry["kv_cache"], entry["dynamic_quantization"])
    assert len(entry["refused"]) == candidates(host_isa_class(), precision).index(chosen)
    for r in entry["refused"]:
        assert "unavailable" in r or r["top1_agreement"] < p.llm_min_top1 or r["mean_logit_cosine"] < p.llm_min_cosine


def test_fp32_runs_the_reference_setting_everywhere(llm_repository):
    table = json.loads((engine_dir(llm_repository, "fp32") / SETTINGS_FILE).read_text())
    assert table["precision"] == "fp32" and table["classes"] == {}
    manifest = read_manifest(llm_repository)
    assert manifest.deployments[f"{LLM_NAME}:fp32"].engine["compute"] == "f32"
    assert manifest.deployments[f"{LLM_NAME}:int8"].engine["runtime"][host_isa_class()]["kv_cache"] in ("u8", "f16",
                                                                                                         "f32")


def test_a_degraded_engine_is_refused_by_the_real_floors(llm_repository, tmp_path):
    """int4 weights per output channel labelled int8: the build's accuracy check refuses them,
    and no runtime setting rescues them."""
    import nncf
    import openvino as ov

    from builder.build.engines.openvino_llm import measure_accuracy
    from builder.build.engines.openvino_runtime import measure_class

    reference = engine_dir(llm_repository, "fp32")
    degraded = tmp_path / "degraded"
    degraded.mkdir()
    model = nncf.compress_weights(ov.Core().read_model(reference / "openvino_model.xml"),
                                  mode=nncf.CompressWeightsMode.INT4_SYM, group_size=-1, ratio=1.0)
    ov.save_model(model, degraded / "openvino_model.xml", compress_to_fp16=False)
    ids = accuracy_ids(llm_repository)
    with pytest.raises(BuildError, match="int8 engine misses its accuracy floor against fp32"):
        measure_accuracy(reference, degraded, ids, "int8")
    with pytest.raises(BuildError, match="no runtime setting of the int8 engine passes"):
        measure_class(reference, degraded, ids, "int8", "avx2")
    good = measure_accuracy(reference, engine_dir(llm_repository, "int8"), ids, "int8")   # the control
    assert good["top1_agreement"] >= PRECISIONS["int8"].llm_min_top1


def test_engine_under_an_avx2_cap_runs_the_avx2_setting(llm_repository):
    table = json.loads((engine_dir(llm_repository, "int8") / SETTINGS_FILE).read_text())
    got = run_capped("AVX2", "tests.support.engine_runtime", {"engine": str(engine_dir(llm_repository, "int8")),
                                                              "text": "The capital of France is"})
    entry = table["classes"]["avx2"]
    assert got["runtime"]["isa_class"] == "avx2" and got["runtime"]["measured"]
    assert (got["runtime"]["compute"], got["runtime"]["kv_cache"]) == (entry["compute"], entry["kv_cache"]) == (
        "f32", entry["kv_cache"])
    assert len(got["ids"]) == 8


def test_triton_engine_logs_its_runtime_setting(llm_server, llm_repository):
    dep = DeploymentName(LLM_NAME, "int8")
    engine_ids(llm_server.grpc_url, dep.llm_engine, [1, 2, 3], 2, -1)
    lines = [ln for ln in Path(llm_server.log_path).read_text(errors="replace").splitlines()
             if f"engine {dep.llm_engine} runtime: " in ln]
    assert lines, "the engine model logs the setting it runs"
    used = dict(re.findall(r"(\w+)=(\S+)", lines[-1].split(" runtime: ", 1)[1].split(" (", 1)[0]))
    table = json.loads((engine_dir(llm_repository, "int8") / SETTINGS_FILE).read_text())
    entry = table["classes"][host_isa_class()]
    assert used["isa_class"] == host_isa_class() and used["measured"] == "True"
    assert (used["compute"], used["kv_cache"], used["dynamic_quantization"]) == (
        entry["compute"], entry["kv_cache"], str(entry["dynamic_quantization"]))


def test_memory_after_concurrent_long_requests_matches_the_manifest(llm_server, llm_repository):
    """The manifest's measured engine memory is what the served engine holds after the same load."""
    dep = DeploymentName(LLM_NAME, "int8")
    engine = read_manifest(llm_repository).deployments[str(dep)].engine
    measured = engine["memory"]
    assert measured["loaded_bytes"] < measured["after_load_test_bytes"] <= engine["memory_bytes"]

    def one(i):
        ids = [(7 + 31 * i + 17 * k) % 20000 + 100 for k in range(1000)]
        return engine_ids(llm_server.grpc_url, dep.llm_engine, ids, 16, -1)

    with ThreadPoolExecutor(8) as pool:
        assert all(len(out) == 16 for out in pool.map(one, range(8)))
    rss = stub_rss_bytes(llm_repository, (dep.llm_engine,))
    print(f"int8 engine stub after 8 x 1000-token requests: {rss / 2**20:.0f} MiB "
          f"(manifest: {measured['after_load_test_bytes'] / 2**20:.0f} MiB)")
    assert 0.5 * measured["after_load_test_bytes"] < rss < 1.5 * measured["after_load_test_bytes"]
