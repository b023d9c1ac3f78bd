"""What both OpenVINO builders (LLM and encoder) share: the optimum-intel fp32 export, deriving
one precision's weights from it, refusing an engine below its accuracy floor, the dry-run plan."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from backends.contract.naming import DeploymentName
from backends.contract.precisions import PRECISIONS
from backends.errors import BuildError
from builder.build.engines import openvino_grouped_int8, openvino_int4

MODEL_XML = "openvino_model.xml"
MODEL_BIN = "openvino_model.bin"


def quantization_of(precision: str, int8_group_size: int | None = None) -> str:
    if precision == "int8" and int8_group_size:
        return (f"int8 weight-only, asymmetric, groups of {int8_group_size} input channels (nncf INT8_ASYM arithmetic); "
                f"activations quantized on the fly in groups of {int8_group_size}")
    return PRECISIONS[precision].openvino


def export_fp32(hf_dir: Path, out_dir: Path, log_path: Path, export_args: list[str]) -> Path:
    """optimum-intel's fp32 export (a subprocess: torch's memory goes when it ends), written
    atomically into out_dir."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model", str(hf_dir),
           *export_args, "--weight-format", "fp32", str(tmp)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not (tmp / MODEL_XML).exists():
        tail = " | ".join(Path(log_path).read_text(errors="replace").strip().splitlines()[-3:])
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(f"the OpenVINO export of {hf_dir} failed ({tail}); full log: {log_path}")
    os.replace(tmp, out_dir)
    return out_dir


def cached_export(ckpt, cache_dir: Path, kind: str, step, label: str,
                  export: Callable[[Path, Path, Path], Path]) -> Path:
    """The fp32 export of a checkpoint (`<cache>/engines/<digest>-<kind>`), made once and reused by
    every precision and every later build of the same checkpoint."""
    ref = Path(cache_dir) / "engines" / f"{ckpt.digest[:24]}-{kind}"
    if not (ref / MODEL_XML).exists():
        ref.parent.mkdir(parents=True, exist_ok=True)
        with step(label):
            export(ckpt.hf_dir, ref, ref.with_suffix(".log"))
    return ref


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def derive(reference: Path, precision: str, out_dir: Path, int8_group_size: int | None = None) -> Path:
    """Write the engine of one precision from the fp32 reference IR. `int8_group_size`: int8
    weights in groups of that many input channels (openvino_grouped_int8) instead of per channel."""
    import openvino as ov

    out_dir.mkdir(parents=True)
    for f in reference.iterdir():  # tokenizer IRs, configs: identical for every precision
        if f.is_file() and f.name not in (MODEL_XML, MODEL_BIN):
            _link_or_copy(f, out_dir / f.name)
    if precision == "fp32":
        for name in (MODEL_XML, MODEL_BIN):
            _link_or_copy(reference / name, out_dir / name)
        return out_dir
    model = ov.Core().read_model(reference / MODEL_XML)
    if precision == "fp16":
        ov.save_model(model, out_dir / MODEL_XML, compress_to_fp16=True)
        return out_dir
    import nncf

    if precision == "int8" and int8_group_size:
        model = openvino_grouped_int8.compress(model, int8_group_size)
    elif precision == "int8":
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    elif precision == "int4":
        model = openvino_int4.compress(model, reference)
    else:  # fp8 per output channel: nncf's default groups of 128 fail on layers narrower than that
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.FP8_E4M3, group_size=-1, ratio=1.0)
    ov.save_model(model, out_dir / MODEL_XML, compress_to_fp16=False)
    return out_dir


def enforce_floor(what: str, precision: str, figures: dict[str, float], floor: dict[str, float]) -> dict:
    """Raise BuildError (the engine is not published) when a figure is below its floor."""
    failed = [f"{k} {figures[k]:.6f} < {v}" for k, v in floor.items() if figures[k] < v]
    if failed:
        raise BuildError(f"the {precision} {what} misses its accuracy floor against fp32 ({', '.join(failed)}): "
                         "it was not published; choose another precision or check the checkpoint")
    return floor


def cpu_plan(spec, ckpt, cache_dir: Path, export_args: str, reference: str, limits: str,
             floor: Callable[[str], str]) -> str:
    """`--dry-run` for an OpenVINO target: the cached fp32 export, then each precision derived."""
    lines = [f"# CPU (OpenVINO) build plan for {spec.name} ({spec.kind}, {limits}, max batch {spec.max_batch_size})",
             "# 1. fp32 reference export, cached per checkpoint:",
             f"optimum-cli export openvino --model {ckpt.hf_dir} {export_args} --weight-format fp32 "
             f"{Path(cache_dir) / 'engines'}/{ckpt.digest[:24]}-{reference}"]
    for i, precision in enumerate(spec.precisions, 2):
        dep = DeploymentName(spec.name, precision)
        models = dep.llm_models() if spec.kind == "llm" else dep.embedding_models()
        lines.append(f"# {i}. {dep}: {PRECISIONS[precision].openvino}; accuracy against fp32 ({floor(precision)}); "
                     f"Triton models {', '.join(models)}")
    return "\n".join(lines)


# A loaded Python model (its stub process: Python, numpy, tokenizers) holds about this much beside
# what its engine holds (40-80 MB measured, docs/serverless.md).
PYTHON_MODEL_BYTES = 80 << 20


def memory_estimate(engine_dir: Path, python_models: int, kv_cache_bytes: int = 0) -> int:
    """What a deployment holds loaded, estimated at build time: its weights, the KV cache its
    engine reserves, and its Python models' processes. Serving measures the real figure."""
    weights = sum(f.stat().st_size for f in Path(engine_dir).glob("*.bin"))
    return weights + kv_cache_bytes + python_models * PYTHON_MODEL_BYTES
