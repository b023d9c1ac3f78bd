"""GPU embeddings: TensorRT encoder plans from the ONNX export, served by Triton's `tensorrt` backend.

The encoder is the only GPU part of an embedding deployment; tokenize and pooling stay the shared
Python models (backends.contract.naming: `embedding_tokenize`, `embedding_pooling`), so only the encoder
model `DeploymentName.embedding_encoder` changes between CPU and GPU.

Per precision:
1. `optimum-cli export onnx` at fp32 (the same export the CPU path starts from);
2. int8 / fp8 only: calibration tensors from the built-in sentences, then ModelOpt's ONNX PTQ
   (`python -m modelopt.onnx.quantization`), which inserts Q/DQ nodes TensorRT compiles as
   explicit quantization;
3. `trtexec` with min/opt/max shapes for every input -> `model.plan`;
4. a `tensorrt` backend config rendered from model_repository/tensorrt_encoder/config.pbtxt.j2.

`build_deployment` puts the plan into a repository between the same tokenize and pooling models
as the CPU encoder; the plan's largest length is the tokenizer's max length.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from backends.contract.naming import DeploymentName
from backends.contract.tensors import TensorSpec
from backends.errors import BuildError, InvalidArgumentError, UnsupportedModelError
from builder.build.deployment import DeploymentSpec
from builder.build.engine_target import BuildJob, BuiltDeployment
from builder.build.engines.gpu import GpuInfo, tensorrt_version
from builder.build.engines.tensorrt_llm import (
    DEFAULT_CALIBRATION_TEXTS,
    ApiCall,
    Step,
    _kwargs_src,
    _run_step,
    prepare_gpu_build,
    read_hf_config,
)
from builder.build.repository import render_config
from builder.build.sources.checkpoint import Checkpoint
from builder.build.sources.embedding_config import read_checkpoint_config

TARGET = "tensorrt"
ENGINE_FORMAT = "tensorrt-plan"
PLAN_NAME = "model.plan"
ONNX_OPSET = 17
ENCODER_PRECISIONS = ("fp16", "int8", "fp8")
# TensorRT 10 (NGC 26.04) runs on compute capability 7.5+; FP8 Q/DQ needs Ada/Hopper/Blackwell.
MIN_COMPUTE_CAPABILITY = {"fp16": (7, 5), "int8": (7, 5), "fp8": (8, 9)}
# Encoders the ONNX export + TensorRT path is set up for (BERT-style; ModelOpt quantizes their MatMuls).
SUPPORTED_ARCHITECTURES = ("BertModel", "RobertaModel", "XLMRobertaModel", "DistilBertModel", "MPNetModel")
CALIBRATION_LENGTH = 128


@dataclass(frozen=True)
class EncoderIO:
    """The encoder's tensors as the ONNX export names them."""

    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, tuple[int, ...]], ...]   # name, dims without the batch dimension
    hidden_size: int
    max_length: int
    library: str                                         # optimum-cli --library


def encoder_io(hf_dir: Path, max_length: int | None = None) -> EncoderIO:
    """Inputs/outputs of the exported encoder, from the checkpoint's config.json.

    token_type_ids is an input when the model has segment embeddings (BERT: type_vocab_size 2);
    a sentence-transformers checkpoint (modules.json) exports token_embeddings and
    sentence_embedding, a plain transformers one last_hidden_state.
    """
    cfg = read_hf_config(hf_dir)
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{hf_dir}: architecture {arch or 'unknown'} has no TensorRT encoder recipe here "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}): use --engine cpu for it")
    hidden = int(cfg.get("hidden_size") or cfg.get("dim") or 0)
    if not hidden:
        raise UnsupportedModelError(f"{hf_dir}/config.json states no hidden_size: cannot size the encoder outputs")
    limit = int(cfg.get("max_position_embeddings") or 512)
    if max_length is not None and max_length > limit:
        raise InvalidArgumentError(f"context size {max_length} exceeds the encoder's limit of {limit} tokens: "
                                   f"use at most {limit}")
    inputs = ["input_ids", "attention_mask"]
    if int(cfg.get("type_vocab_size", 0) or 0) > 1:
        inputs.append("token_type_ids")
    if (Path(hf_dir) / "modules.json").is_file():
        outputs = (("token_embeddings", (-1, hidden)), ("sentence_embedding", (hidden,)))
        library = "sentence_transformers"
    else:
        outputs = (("last_hidden_state", (-1, hidden)),)
        library = "transformers"
    return EncoderIO(tuple(inputs), outputs, hidden, max_length or limit, library)


def check_precision_supported(precision: str, gpu: GpuInfo) -> None:
    """Refuse a precision TensorRT cannot run on this GPU, naming what would work."""
    if precision not in ENCODER_PRECISIONS:
        raise BuildError(f"{precision} encoders are CPU-only: choose from {', '.join(ENCODER_PRECISIONS)} on GPU")
    need = MIN_COMPUTE_CAPABILITY[precision]
    if gpu.compute_capability >= need:
        return
    works = [p for p in ENCODER_PRECISIONS if gpu.compute_capability >= MIN_COMPUTE_CAPABILITY[p]]
    if not works:
        raise BuildError(f"TensorRT 10 needs compute capability 7.5 or newer; this GPU is {gpu.describe()}: "
                         "build the encoder with --engine cpu")
    raise BuildError(f"{precision} needs compute capability >= {need[0]}.{need[1]}; this GPU is "
                     f"{gpu.describe()}, which supports {', '.join(works)}: use --precision {','.join(works)}")


@dataclass(frozen=True)
class EncoderShapes:
    max_batch_size: int
    max_length: int

    def profile(self, names: tuple[str, ...]) -> dict[str, str]:
        """trtexec --minShapes/--optShapes/--maxShapes values (batch x sequence for every input)."""
        opt_b, opt_l = min(self.max_batch_size, 8), min(self.max_length, CALIBRATION_LENGTH)
        shape = lambda b, l: ",".join(f"{n}:{b}x{l}" for n in names)  # noqa: E731
        return {"min": shape(1, 1), "opt": shape(opt_b, opt_l), "max": shape(self.max_batch_size, self.max_length)}


def default_work_dir(spec: DeploymentSpec, precision: str) -> Path:
    return Path(tempfile.gettempdir()) / "serverless-triton-trt-encoder" / f"{spec.name}-{precision}"


def trtexec_argv(onnx: Path, plan: Path, io: EncoderIO, shapes: EncoderShapes, quantized: bool) -> list[str]:
    profile = shapes.profile(io.inputs)
    argv = ["trtexec", f"--onnx={onnx}", f"--saveEngine={plan}",
            f"--minShapes={profile['min']}", f"--optShapes={profile['opt']}", f"--maxShapes={profile['max']}"]
    # Q/DQ graphs from ModelOpt carry their own types (fp16 elsewhere): build them strongly typed.
    argv += ["--stronglyTyped"] if quantized else ["--fp16"]
    return argv + ["--skipInference"]


def write_calibration_npz(tokenizer_json: str, inputs: list[str], out_path: str,
                          length: int = CALIBRATION_LENGTH) -> Path:
    """Tokenize the built-in sentences into `out_path` (.npz keyed by ONNX input name), the
    calibration format ModelOpt's ONNX quantization reads. Runs on the build host."""
    import numpy as np  # noqa: PLC0415 - build host only
    from tokenizers import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_file(tokenizer_json)
    tok.enable_truncation(length)
    tok.enable_padding(length=length)
    enc = tok.encode_batch(list(DEFAULT_CALIBRATION_TEXTS))
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    arrays = {name: np.array([getattr(e, fields[name]) for e in enc], dtype=np.int64) for name in inputs}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return out


def steps(spec: DeploymentSpec, precision: str, hf_dir: Path, engine_dir: Path,
          work_dir: Path | None = None) -> list[Step]:
    if spec.kind != "embedding":
        raise InvalidArgumentError(f"{spec.name} is an {spec.kind} model: TensorRT encoder plans are for embeddings")
    if precision not in ENCODER_PRECISIONS:
        raise BuildError(f"{precision} encoders are CPU-only: choose from {', '.join(ENCODER_PRECISIONS)} on GPU")
    hf_dir, engine_dir = Path(hf_dir), Path(engine_dir)
    io = encoder_io(hf_dir, spec.context_size)
    shapes = EncoderShapes(spec.max_batch_size, io.max_length)
    work = Path(work_dir) if work_dir else default_work_dir(spec, precision)
    onnx = work / "onnx" / "model.onnx"
    out = [Step(f"ONNX export (fp32, opset {ONNX_OPSET}, {io.library})", argv=(
        "optimum-cli", "export", "onnx", "--model", str(hf_dir), "--task", "feature-extraction",
        "--library", io.library, "--opset", str(ONNX_OPSET), str(onnx.parent)))]
    quantized = precision in ("int8", "fp8")
    if quantized:
        calib = work / "calibration.npz"
        call = ApiCall("builder.build.engines.tensorrt_encoder.write_calibration_npz", {
            "tokenizer_json": str(hf_dir / "tokenizer.json"), "inputs": list(io.inputs),
            "out_path": str(calib), "length": min(CALIBRATION_LENGTH, io.max_length)})
        out.append(Step("calibration tensors (built-in sentences)", calls=(call,), code=(
            "from builder.build.engines.tensorrt_encoder import write_calibration_npz\n"
            f"write_calibration_npz({_kwargs_src(call.kwargs)})\n")))
        quant_onnx = work / "onnx" / f"model.{precision}.onnx"
        out.append(Step(f"ModelOpt ONNX PTQ ({precision} Q/DQ)", argv=(
            "python3", "-m", "modelopt.onnx.quantization", f"--onnx_path={onnx}",
            f"--quantize_mode={precision}", f"--calibration_data={calib}",
            "--high_precision_dtype=fp16", f"--output_path={quant_onnx}")))
        onnx = quant_onnx
    out.append(Step(f"trtexec ({precision}, batch 1..{shapes.max_batch_size}, length 1..{shapes.max_length})",
                    argv=tuple(trtexec_argv(onnx, engine_dir / PLAN_NAME, io, shapes, quantized))))
    return out


def plan(spec: DeploymentSpec, precision: str, hf_dir: Path, engine_dir: Path) -> list[list[str] | str]:
    return [s.describe() for s in steps(spec, precision, hf_dir, engine_dir)]


def engine_dir_in(repository: Path, dep: DeploymentName) -> Path:
    """The plan lives in the encoder model's version directory (Triton's default_model_filename)."""
    return Path(repository) / dep.embedding_encoder / "1"


def plan_text(spec: DeploymentSpec, hf_dir: Path, repository: Path, precisions: list[str] | None = None) -> str:
    lines = [f"# TensorRT encoder build plan for {spec.name} ({Path(hf_dir)})"]
    for precision in precisions or spec.precisions:
        dep = DeploymentName(spec.name, precision)
        plan_steps = steps(spec, precision, hf_dir, engine_dir_in(repository, dep))
        lines += ["", f"## {dep} -> Triton model {dep.embedding_encoder} (tensorrt backend)"]
        for i, step in enumerate(plan_steps, 1):
            lines += [f"# {i}. {step.title}", step.shell()]
        lines.append(f"# {len(plan_steps) + 1}. render {dep.embedding_encoder}/config.pbtxt")
    return "\n".join(lines) + "\n"


def render_encoder_config(dep: DeploymentName, spec: DeploymentSpec, io: EncoderIO) -> str:
    return render_config(
        "tensorrt_encoder",
        name=dep.embedding_encoder,
        max_batch_size=spec.max_batch_size,
        plan_name=PLAN_NAME,
        inputs=[TensorSpec(n, "TYPE_INT64", (-1,)) for n in io.inputs],
        outputs=[TensorSpec(n, "TYPE_FP32", d) for n, d in io.outputs],
        instance_count=1,
        max_queue_delay_microseconds=100,
    )


def render_encoder_model(dep: DeploymentName, spec: DeploymentSpec, hf_dir: Path, model_dir: Path) -> None:
    """Write `model_dir/config.pbtxt` and `model_dir/1/` (where model.plan goes)."""
    model_dir = Path(model_dir)
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    io = encoder_io(Path(hf_dir), spec.context_size)
    (model_dir / "config.pbtxt").write_text(render_encoder_config(dep, spec, io))


def build(spec: DeploymentSpec, precision: str, hf_dir: Path, engine_dir: Path, *,
          gpu: GpuInfo | None = None, run: Callable = subprocess.run, keep_work_dir: bool = False) -> dict:
    """Run the plan on this GPU host; return the manifest `engine` entry for the plan."""
    gpu, work, log = prepare_gpu_build(precision, engine_dir, gpu, "TensorRT encoder plans", check_precision_supported,
                                       default_work_dir(spec, precision))
    trt = tensorrt_version()
    if trt is None:
        raise BuildError("cannot tell the TensorRT version on this host: build inside the docker/Dockerfile.gpu "
                         "image, or set TRT_VERSION")
    for step in steps(spec, precision, hf_dir, engine_dir, work):
        _run_step(step, log, run)
    if not (Path(engine_dir) / PLAN_NAME).is_file():
        raise BuildError(f"trtexec finished but {engine_dir}/{PLAN_NAME} is missing: see {log}")
    io = encoder_io(Path(hf_dir), spec.context_size)
    if not keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "target": TARGET, "format": ENGINE_FORMAT, "version": trt, "tensorrt_version": trt,
        "gpu_arch": {"compute_capability": gpu.cc, "sm": gpu.sm, "name": gpu.name, "family": gpu.family},
        "build_image": os.environ.get("SERVERLESS_TRITON_GPU_IMAGE"),
        "quantization": {"precision": precision,
                         "mode": "modelopt-onnx-ptq" if precision in ("int8", "fp8") else "fp16"},
        "context_size": io.max_length, "max_batch_size": spec.max_batch_size,
        "inputs": list(io.inputs), "outputs": [n for n, _ in io.outputs],
        "world_size": 1,
    }


def build_deployment(job: BuildJob, *, gpu: GpuInfo | None = None, run: Callable = subprocess.run) -> BuiltDeployment:
    """One embedding deployment `<name>:<precision>` with a TensorRT encoder, into the staging
    repository. Accuracy against fp32 needs the TensorRT runtime: scripts/gpu_check.py measures it
    on the GPU host."""
    dep, spec, ckpt = job.dep, job.spec, job.ckpt
    config = read_checkpoint_config(ckpt.hf_dir, ckpt.config, spec.pooling, spec.context_size, ckpt.origin)
    config = dataclasses.replace(config, max_length=min(config.max_length, job.context_size))
    io = encoder_io(Path(ckpt.hf_dir), config.max_length)
    config = dataclasses.replace(config, encoder_inputs=io.inputs)
    sized = dataclasses.replace(spec, context_size=config.max_length)   # plan shapes up to the tokenizer's limit
    model_dir = job.writer.fresh_model_dir(dep.embedding_encoder)
    with job.step(f"building the TensorRT {job.precision} encoder plan"):
        info = build(sized, job.precision, Path(ckpt.hf_dir), model_dir / "1", gpu=gpu, run=run)
    render_encoder_model(dep, sized, Path(ckpt.hf_dir), model_dir)
    models = job.writer.write_embedding_pipeline(dep, ckpt.hf_dir, config, spec.max_batch_size,
                                                 encoder_output=io.outputs[0][0])
    return BuiltDeployment(models, {"infer": dep.embedding}, info,
                           {"reference": "fp32", "method": "scripts/gpu_check.py on the GPU host"})


def format_plan(spec: DeploymentSpec, ckpt: Checkpoint, context_size: int, output: Path, cache_dir: Path) -> str:
    return plan_text(spec, ckpt.hf_dir, Path(output)).rstrip("\n")
