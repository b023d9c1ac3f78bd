"""Build one LLM deployment `<name>:<precision>` into a staging repository.

CPU: fp32 reference export (cached per checkpoint), the precision's engine derived from it, the
accuracy figure against the reference (refused below the precision's floor), then the Triton models.
GPU: TensorRT-LLM builds the engine; the preprocessing/postprocessing/ensemble are the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from builder import repository
from builder.engines import openvino_llm as ov_llm
from builder.naming import DeploymentName
from builder.sources.checkpoint import Checkpoint

_reference_logits: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}


def reference_ir(ckpt: Checkpoint, cache_dir: Path, step) -> Path:
    """The fp32 OpenVINO export of a checkpoint, made once and kept in the cache."""
    return ov_llm.cached_export(ckpt, cache_dir, "fp32", step,
                                "exporting the fp32 reference with optimum-intel (about 30 s for 135M parameters)",
                                ov_llm.export_reference)


def accuracy_ids(hf_dir: Path) -> list[int]:
    from backends.tokenization import ModelTokenizer

    return ModelTokenizer.load(hf_dir).encode(ov_llm.ACCURACY_TEXT)


def measure_accuracy(reference: Path, engine_dir: Path, ids: list[int], precision: str) -> dict:
    key = (str(reference), tuple(ids))
    if key not in _reference_logits:
        _reference_logits[key] = ov_llm.teacher_forced_logits(reference, ids)
    figures = ov_llm.agreement(_reference_logits[key], ov_llm.teacher_forced_logits(engine_dir, ids))
    floor = ov_llm.check_floor(precision, figures)
    return {"reference": "fp32", "method": "teacher-forced logits on a fixed text",
            "positions": len(ids), **figures, "floor": floor}


def build_deployment(spec, precision: str, ckpt: Checkpoint, engine: str, context: int, staging: Path,
                     cache_dir: Path, step) -> dict:
    dep = DeploymentName(spec.name, precision)
    models = repository.write_llm_shared(staging, dep, ckpt.hf_dir, context, spec.max_batch_size)
    if engine == "tensorrt-llm":
        from builder.engines import tensorrt_llm as trt

        model_dir = repository.fresh_model_dir(staging, dep.llm_engine)
        with step(f"building the TensorRT-LLM {precision} engine"):
            info = trt.build(spec, precision, ckpt.hf_dir, model_dir / "1" / "engine")
        trt.render_engine_model(dep, spec, f"{dep.llm_engine}/1/engine", model_dir)
        accuracy = {"reference": "fp32", "method": "scripts/gpu_check.py on the GPU host"}
    else:
        reference = reference_ir(ckpt, cache_dir, step)
        work = staging / ".work" / dep.llm_engine
        with step(f"deriving the {precision} engine ({ov_llm.quantization_of(precision)})"):
            ov_llm.derive(reference, precision, work)
        with step("measuring accuracy against fp32"):
            accuracy = measure_accuracy(reference, work, accuracy_ids(ckpt.hf_dir), precision)
        repository.write_llm_cpu_engine(staging, dep, work, context, spec.max_batch_size)
        info = ov_llm.engine_info(precision, context, spec.max_batch_size)
    models.append(dep.llm_engine)
    models += repository.write_llm_front(staging, dep, ckpt.hf_dir, spec.max_batch_size)
    return {"triton_models": models, "entrypoints": {"infer": dep.llm, "stream": dep.llm_stream},
            "engine": info, "accuracy": accuracy}
