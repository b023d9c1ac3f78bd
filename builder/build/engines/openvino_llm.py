"""CPU LLM engines on OpenVINO: one fp32 export per checkpoint, then one engine per precision.

The fp32 IR (optimum-intel's export, stateful, with OpenVINO tokenizers) is the reference; the
other precisions are derived from it, so torch runs once per checkpoint:
fp16 weights (compress_to_fp16), int8 weight-only (nncf INT8_ASYM, per channel, no calibration),
fp8 e4m3 weights (nncf FP8_E4M3), grouped int4 weights (openvino_int4: nncf INT4_ASYM with AWQ
and scale estimation). fp32 computes at f32; the others at the runtime setting measured per ISA
class (openvino_runtime).

As an engine target (builder/build/engine_target.py): the precision's engine with its accuracy
figure against the fp32 reference (refused below the precision's floor), then the Triton models.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from backends.contract.precisions import PRECISIONS
from backends.llm_engine import kv_cache_gib
from backends.tokenization import ModelTokenizer
from builder.build.deployment import DeploymentSpec
from builder.build.engine_target import BuildJob, BuiltDeployment
from builder.build.engines import openvino_memory, openvino_runtime
from builder.build.engines.openvino_common import (
    MODEL_BIN,
    MODEL_XML,
    PYTHON_MODEL_BYTES,
    cached_export,
    cpu_plan,
    derive,
    enforce_floor,
    export_fp32,
    memory_estimate,
    quantization_of,
)
from builder.build.engines.openvino_runtime import agreement
from builder.build.sources.checkpoint import Checkpoint

log = logging.getLogger(__name__)

# A fixed, varied text for the teacher-forced accuracy figure (prose, numbers, code, dialogue).
ACCURACY_TEXT = (
    "The Rhine rises in the Swiss Alps and flows north through Germany and the Netherlands before it "
    "reaches the North Sea, a journey of roughly 1,230 kilometres. Barges carry coal, grain and "
    "containers along it, and in 2018 a dry summer left the river so low that many of them could only "
    "load a third of their usual cargo.\n\n"
    "def moving_average(values, window):\n"
    "    total = sum(values[:window])\n"
    "    yield total / window\n"
    "    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n"
    "        yield total / window\n\n"
    "User: Can you explain why the sky is blue?\n"
    "Assistant: Sunlight contains every colour, but air molecules scatter short wavelengths much more "
    "strongly than long ones. Blue light is therefore scattered across the whole sky, while the light "
    "that reaches us straight from the sun looks slightly yellow. At sunset the path through the air "
    "is longer, most of the blue is scattered away, and reds and oranges remain."
)


def export_reference(hf_dir: Path, out_dir: Path, log_path: Path) -> Path:
    """The stateful fp32 export, with OpenVINO tokenizers (openvino-genai's pipeline reads them)."""
    return export_fp32(hf_dir, out_dir, log_path, ["--task", "text-generation-with-past"])


def teacher_forced_logits(engine_dir: Path, ids: list[int]) -> np.ndarray:
    """Logits at every position of ids in one forward pass, computed at f32."""
    import openvino as ov

    compiled = ov.Core().compile_model(Path(engine_dir) / MODEL_XML, "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"})
    request = compiled.create_infer_request()
    n = len(ids)
    request.infer({"input_ids": np.array([ids], dtype=np.int64),
                   "attention_mask": np.ones((1, n), dtype=np.int64),
                   "position_ids": np.arange(n, dtype=np.int64)[None],
                   "beam_idx": np.zeros(1, dtype=np.int32)})
    return request.get_tensor("logits").data[0].copy()


def check_floor(precision: str, figures: dict[str, float]) -> dict[str, float]:
    """The floor this precision must meet; raises BuildError (engine not published) below it."""
    p = PRECISIONS[precision]
    return enforce_floor("engine", precision, figures,
                         {"top1_agreement": p.llm_min_top1, "mean_logit_cosine": p.llm_min_cosine})


def engine_info(precision: str, context_size: int, max_batch_size: int, engine_dir: Path | None = None,
                runtime: dict | None = None, memory: dict | None = None) -> dict:
    """The manifest's engine entry. `runtime`: the per-ISA settings table (openvino_runtime);
    `memory`: the engine's measured RSS (openvino_memory), else memory_bytes is an estimate."""
    import openvino as ov
    import openvino_genai as og

    return {
        "target": "cpu",
        "format": "openvino-ir",
        "version": f"openvino {ov.__version__.split('-')[0]}, openvino-genai {og.__version__.split('-')[0]}",
        "quantization": quantization_of(precision),
        "compute": "per host (runtime)" if runtime and runtime["classes"] else "f32",
        **({"runtime": openvino_runtime.summary(runtime)} if runtime else {}),
        "context_size": context_size,
        "max_batch_size": max_batch_size,
        **({"memory_bytes": memory_estimate(engine_dir, LLM_PYTHON_MODELS,
                                            kv_cache_gib(engine_dir, context_size, max_batch_size) << 30)}
           if engine_dir is not None and memory is None else {}),
        # measured: the engine's stub; estimated: the four other Python models' stubs
        **({"memory_bytes": memory["after_load_test_bytes"] + (LLM_PYTHON_MODELS - 1) * PYTHON_MODEL_BYTES,
            "memory": memory} if memory is not None else {}),
    }


def preoptimize(engine_dir: Path, ids: list[int], precision: str) -> str:
    """Rewrite the engine's IR once, at build time, where the logits stay bit-identical; returns
    what was kept ("moc+fused", "moc" or "" for the IR as exported).

    - OpenVINO's MOC transformations (what every compile_model starts with): each load's compile
      inside the continuous-batching pipeline then has less to rewrite (SmolLM2-135M int8: 1.02 s
      -> 0.92 s, issue 16). The pipeline's compiled model cannot be cached instead: OpenVINO
      2026.4's CPU plugin cannot import a PagedAttention model it exported ("Runtime info
      k_head_size and num_k_heads are required"), so CACHE_DIR only rewrites the blob on every load.
    - Compressed q/k/v and gate/up projections fused into one MatMul each (openvino_fusion; not for
      fp32, the reference): faster decoding, most for one sequence.

    Each rewrite is kept only when the logits stay bit-identical, at f32 and at the fastest setting
    this host's class may choose, and the weights grow by at most 1%; the fused IR is tried first,
    then MOC alone (fp16's fused projections round differently under bf16 compute)."""
    import os
    import shutil

    import openvino as ov
    from openvino._offline_transformations import apply_moc_transformations

    from backends.cpu_isa import host_isa_class
    from backends.cpu_runtime import REFERENCE, candidates
    from builder.build.engines.openvino_fusion import fuse_shared_input_matmuls

    engine_dir = Path(engine_dir)
    tmp = engine_dir / ".preoptimized"
    settings = list(dict.fromkeys([REFERENCE, candidates(host_isa_class(), precision)[0]]))
    moc = ov.Core().read_model(engine_dir / MODEL_XML)
    apply_moc_transformations(moc, cf=True)
    variants = [("moc", moc)]
    if precision != "fp32":
        fused = moc.clone()
        try:
            if fuse_shared_input_matmuls(fused):
                variants.insert(0, ("moc+fused", fused))
        except Exception as e:  # noqa: BLE001 -- a graph the fusion cannot rewrite: MOC alone
            log.info("projections not fused: %s", e)
    before: list[np.ndarray] = []
    try:
        for variant, model in variants:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            ov.save_model(model, tmp / MODEL_XML, compress_to_fp16=False)
            if (tmp / MODEL_BIN).stat().st_size > 1.01 * (engine_dir / MODEL_BIN).stat().st_size:
                continue
            with ThreadPoolExecutor(2) as pool:   # two at a time: compile_model is mostly single-threaded
                try:
                    before = before or list(pool.map(lambda s: openvino_runtime.logits(engine_dir, ids, s),
                                                     settings))
                except RuntimeError:   # a setting this host cannot run (int8 DQ under an AVX2 oneDNN cap)
                    return ""
                try:
                    same = all(np.array_equal(a, b) for a, b in zip(
                        before, pool.map(lambda s: openvino_runtime.logits(tmp, ids, s), settings), strict=True))
                except RuntimeError:   # only the rewritten IR fails to compile or run: the next variant
                    continue
            if same:   # replace the files (never write through: fp32's are hard links to the cached reference)
                for name in (MODEL_XML, MODEL_BIN):
                    os.replace(tmp / name, engine_dir / name)
                return variant
        return ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the engine target ------------------------------------------------------------------------

LLM_PYTHON_MODELS = 5      # preprocessing, postprocessing, engine, engine call, stream


def reference_ir(ckpt: Checkpoint, cache_dir: Path, step) -> Path:
    """The fp32 OpenVINO export of a checkpoint, made once and kept in the cache."""
    return cached_export(ckpt, cache_dir, "fp32", step,
                         "exporting the fp32 reference with optimum-intel (about 30 s for 135M parameters)",
                         export_reference)


def measure_accuracy(reference: Path, engine_dir: Path, ids: list[int], precision: str) -> dict:
    """The engine's teacher-forced logits against the reference's, which the runtime-setting
    measurement shares (computed once per build process; f32 compute and KV cache either way)."""
    figures = agreement(openvino_runtime.reference_logits(reference, ids), teacher_forced_logits(engine_dir, ids))
    floor = check_floor(precision, figures)
    return {"reference": "fp32", "method": "teacher-forced logits on a fixed text",
            "positions": len(ids), **figures, "floor": floor}


def build_deployment(job: BuildJob) -> BuiltDeployment:
    dep, spec, w = job.dep, job.spec, job.writer
    models = w.write_llm_shared(dep, job.ckpt.hf_dir, job.context_size, spec.max_batch_size)
    reference = reference_ir(job.ckpt, job.cache_dir, job.step)
    work = job.staging / ".work" / dep.llm_engine
    with job.step(f"deriving the {job.precision} engine ({quantization_of(job.precision)})"):
        derive(reference, job.precision, work)
    ids = ModelTokenizer.load(job.ckpt.hf_dir).encode(ACCURACY_TEXT)
    with job.step("pre-optimizing the IR: faster loads, fused projections (kept only if the logits stay "
                  "bit-identical)"):
        rewrites = preoptimize(work, ids, job.precision)
    with job.step("measuring accuracy against fp32"):
        accuracy = measure_accuracy(reference, work, ids, job.precision)
    with job.step("choosing runtime settings per CPU class (each measured against fp32)"):
        runtime = openvino_runtime.measure_settings(reference, work, ids, job.precision)
        openvino_runtime.write_settings(work, runtime)
    models.append(w.write_llm_cpu_engine(dep, work, job.context_size, spec.max_batch_size, spec.prompt_lookup))
    models += w.write_llm_front(dep, job.ckpt.hf_dir, spec.max_batch_size)
    memory = None   # without the load test, engine_info estimates it from the weights
    if spec.memory_test:
        with job.step(f"measuring the engine's memory ({openvino_memory.LOAD_TEST_CLIENTS} concurrent requests)"):
            memory = openvino_memory.measure(model_dir_engine(job), job.context_size, spec.max_batch_size,
                                             spec.prompt_lookup)
    info = engine_info(job.precision, job.context_size, spec.max_batch_size, model_dir_engine(job), runtime, memory)
    info["prompt_lookup"] = spec.prompt_lookup
    info["ir_rewrites"] = rewrites or "none"    # what preoptimize kept: moc, moc+fused (projections)
    return BuiltDeployment(models, {"infer": dep.llm, "stream": dep.llm_stream}, info, accuracy)


def model_dir_engine(job: BuildJob) -> Path:
    return job.staging / job.dep.llm_engine / "1" / "engine"


def format_plan(spec: DeploymentSpec, ckpt: Checkpoint, context_size: int, output: Path, cache_dir: Path) -> str:
    return cpu_plan(spec, ckpt, cache_dir, "--task text-generation-with-past", "fp32", f"context {context_size}",
                    lambda p: f"top-1 >= {PRECISIONS[p].llm_min_top1}, logit cosine >= {PRECISIONS[p].llm_min_cosine}")
