"""GPU engines: TensorRT-LLM 1.2.x engines per precision, served by the stock `tensorrtllm` backend.

TensorRT-LLM dropped its TensorRT engine backend after 1.2.x, so engines are built with 1.2.x
(see docker/Dockerfile.gpu) in three documented steps per precision:

1. checkpoint: `LLaMAForCausalLM.from_hugging_face(...).save_checkpoint(...)` (fp16; int8 and int4
   weight-only, W8A16 / W4A16, need no calibration) or `tensorrt_llm.quantization.quantize_and_export(...)` (ModelOpt
   calibration: fp8 weights + fp8 KV cache, or int8 weight-only + int8 KV cache);
2. `trtllm-build` with the deployment's context size and batch limits;
3. a `tensorrtllm` model config rendered from model_repository/tensorrt_llm/config.pbtxt.j2, with
   the xgrammar tokenizer info its guided decoding (structured output) reads.

`plan()` returns those steps as data (argv lists and Python API calls) so `--dry-run` can print
them and tests/test_tensorrt_llm_contract.py can check every argument against TensorRT-LLM 1.2's
own argparse definitions and signatures without a GPU. `build()` runs them on a GPU host.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backends.contract.naming import DeploymentName
from backends.contract.precisions import PRECISIONS
from backends.errors import BuildError, InvalidArgumentError, SourceError, UnsupportedModelError
from builder.build.deployment import DeploymentSpec
from builder.build.engine_target import BuildJob, BuiltDeployment
from builder.build.engines.gpu import GpuInfo, host_gpu, tensorrt_llm_version, tensorrt_version
from builder.build.repository import render_config
from builder.build.sources.checkpoint import Checkpoint, resolve_context_size

TRTLLM_SERIES = "1.2"            # engines are built with TensorRT-LLM 1.2.x, nothing else
TARGET = "tensorrt-llm"          # manifest engine.target
ENGINE_FORMAT = "tensorrt-llm-engine"

# HF architectures whose TensorRT-LLM model class is LLaMAForCausalLM (tensorrt_llm.models.MODEL_MAP).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
GPU_PRECISIONS = ("fp16", "int8", "fp8", "int4")

# QuantConfig._get_modelopt_qformat / _get_modelopt_kv_cache_dtype in TensorRT-LLM 1.2.
_MODELOPT_QFORMAT = {None: "full_prec", "W8A16": "int8_wo", "W4A16": "int4_wo", "FP8": "fp8"}
_MODELOPT_KV_DTYPE = {None: None, "INT8": "int8", "FP8": "fp8"}

XGRAMMAR_TOKENIZER_INFO = "xgrammar_tokenizer_info.json"   # beside the engine, in the model's version dir
DEFAULT_CALIBRATION_SIZE = 512   # quantize.py's default --calib_size
CALIBRATION_MAX_SEQ_LEN = 512    # quantize.py's default --calib_max_seq_length
DEFAULT_MAX_NUM_TOKENS = 8192    # BuildConfig.max_num_tokens default
KV_CACHE_FREE_GPU_MEM_FRACTION = 0.9

# The small built-in calibration set: varied registers and lengths, so FP8 / INT8-KV scales see
# code, numbers, dialogue and prose. Point `calibration_dataset` at your own data for production.
DEFAULT_CALIBRATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Explain the difference between a process and a thread in an operating system.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong and Buzz Aldrin walked on its surface.",
    "User: What is the capital of Australia?\nAssistant: The capital of Australia is Canberra.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "SELECT name, COUNT(*) FROM orders WHERE total > 100 GROUP BY name ORDER BY 2 DESC;",
    "Dear team, the quarterly report is attached. Revenue grew 12% while costs fell 3%.",
    "To bake bread, mix flour, water, salt and yeast, knead for ten minutes, and let it rise.",
    "The mitochondria is often called the powerhouse of the cell because it produces ATP.",
    "Write a haiku about autumn leaves falling into a quiet river at dusk.",
    "Rust's ownership model guarantees memory safety without a garbage collector.",
    "The derivative of x squared is 2x, and the integral of 2x is x squared plus a constant.",
    "Customer: My order arrived damaged. Agent: I'm sorry to hear that; I'll send a replacement.",
    "Climate models predict rising sea levels as glaciers and ice sheets continue to melt.",
    "A binary search tree keeps smaller keys in the left subtree and larger keys in the right.",
    "La tour Eiffel a été construite pour l'Exposition universelle de 1889 à Paris.",
    "Der Rhein fließt durch die Schweiz, Liechtenstein, Österreich, Deutschland und die Niederlande.",
    "El agua hierve a cien grados Celsius al nivel del mar.",
    "import numpy as np\nx = np.linspace(0, 1, 100)\ny = np.sin(2 * np.pi * x)\nprint(y.mean())",
    "Summarize: The meeting covered budget planning, hiring for two roles, and the Q3 roadmap.",
    "Shakespeare wrote Hamlet, Macbeth, Othello and King Lear among many other plays.",
    "Translate to French: The library opens at nine in the morning and closes at six.",
    "The stock market fell sharply on Monday after the central bank raised interest rates.",
    "Step 1: unplug the router. Step 2: wait thirty seconds. Step 3: plug it back in.",
    "Water molecules consist of two hydrogen atoms bonded to a single oxygen atom.",
    "Once upon a time, in a village between two mountains, there lived a curious girl named Ada.",
    "HTTP status 404 means the server could not find the requested resource.",
    "The Pythagorean theorem states that a squared plus b squared equals c squared.",
    "Please list three benefits of regular exercise and one risk of overtraining.",
    "{\"name\": \"Alice\", \"age\": 30, \"languages\": [\"English\", \"Spanish\"]}",
    "Machine learning models can overfit when they memorize training data instead of generalizing.",
    "The Great Wall of China stretches for thousands of kilometres across northern China.",
    "git commit -m \"Fix off-by-one error in pagination\" && git push origin main",
    "Vaccines train the immune system to recognize pathogens without causing the disease.",
    "What are the main causes of the French Revolution? Answer in three sentences.",
    "The train departs at 07:45 from platform 3 and arrives at 10:20 in the capital.",
    "Quantum computers use qubits, which can represent zero and one at the same time.",
    "A good password is long, unique for each site, and stored in a password manager.",
    "The recipe calls for 200 g of sugar, 3 eggs, 250 ml of milk and a pinch of salt.",
    "Newton's second law says that force equals mass times acceleration.",
    "User: Can you recommend a book about history?\nAssistant: Try 'Guns, Germs, and Steel'.",
    "The Amazon rainforest produces a significant share of the world's oxygen and hosts rich biodiversity.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')",
    "Solar panels convert sunlight directly into electricity using photovoltaic cells.",
    "The committee will vote on the proposal next Tuesday after the public comment period ends.",
    "Describe a sunset over the ocean using vivid sensory details.",
    "TCP guarantees ordered delivery, whereas UDP trades reliability for lower latency.",
    "Mount Everest, at 8,849 metres, is the highest mountain above sea level.",
    "The patient reported mild headaches and was advised to drink more water and rest.",
    "Blockchain ledgers record transactions in linked blocks secured by cryptographic hashes.",
    "Give me a short motivational message for someone starting a new job tomorrow.",
    "The orchestra tuned their instruments before the conductor raised the baton.",
    "Inflation measures how quickly the general price level of goods and services rises.",
    "SmolLM2 is a family of compact language models trained to follow instructions.",
    "Kubernetes schedules containers onto nodes and restarts them when they fail.",
    "The museum's new exhibit features ancient pottery, jewelry and tools from Mesopotamia.",
    "If it rains tomorrow, the picnic will move indoors to the community hall.",
    "Regular expressions like ^[a-z]+$ match strings made only of lowercase letters.",
    "Electric cars produce no tailpipe emissions, but batteries require mining of lithium.",
    "A haiku has three lines with five, seven and five syllables respectively.",
    "The detective examined the muddy footprints leading from the garden to the study window.",
    "Thank you for your message. I will reply in detail by the end of the week.",
    "Prime numbers have exactly two divisors: one and themselves, like 2, 3, 5, 7 and 11.",
)

_FP8_FAMILIES = "Ada Lovelace, Hopper or Blackwell"   # compute capability 8.9 and newer


# -- checks -----------------------------------------------------------------------------------

def supported_precisions(gpu: GpuInfo) -> list[str]:
    """The GPU precisions TensorRT-LLM 1.2 can build for this GPU (empty: none at all)."""
    return [p for p in GPU_PRECISIONS
            if gpu.compute_capability >= PRECISIONS[p].min_compute_capability]


def check_precision_supported(precision: str, gpu: GpuInfo) -> None:
    """Refuse a precision this GPU cannot run with TensorRT-LLM 1.2, naming what would work."""
    if precision not in GPU_PRECISIONS:
        raise BuildError(
            f"{precision} is not a TensorRT-LLM precision ({precision} engines are CPU-only): "
            f"choose from {', '.join(GPU_PRECISIONS)} for --engine tensorrt-llm")
    need = PRECISIONS[precision].min_compute_capability
    if gpu.compute_capability >= need:
        return
    need_text = f"{need[0]}.{need[1]}"
    works = supported_precisions(gpu)
    if not works:
        low = min(PRECISIONS[p].min_compute_capability for p in GPU_PRECISIONS)
        raise BuildError(
            f"TensorRT-LLM {TRTLLM_SERIES} needs compute capability {low[0]}.{low[1]} (Ampere) or newer; "
            f"this GPU is {gpu.describe()}: build with --engine cpu instead")
    why = f" ({_FP8_FAMILIES})" if precision == "fp8" else ""
    raise BuildError(
        f"{precision} needs compute capability >= {need_text}{why}; this GPU is {gpu.describe()}, "
        f"which supports {', '.join(works)}: use --precision {','.join(works)} (or build {precision} "
        "on a newer GPU)")


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError(f"{hf_dir} has no config.json: point the source at a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} is not readable JSON ({e}): re-download or re-convert the checkpoint") from None


def check_architecture(hf_dir: Path) -> str:
    """The checkpoint's architecture, if TensorRT-LLM engines are built for it here; else refuse."""
    archs = read_hf_config(hf_dir).get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{hf_dir}: architecture {arch or 'unknown (config.json names none)'} has no TensorRT-LLM "
            f"engine recipe here (supported: {', '.join(SUPPORTED_ARCHITECTURES)}): use --engine cpu for it")
    return arch


@dataclass(frozen=True)
class EngineShape:
    """How the deployment's limits map to TensorRT-LLM's BuildConfig fields."""

    max_batch_size: int
    max_seq_len: int        # BuildConfig.max_seq_len = context size (prompt + output)
    max_input_len: int      # BuildConfig.max_input_len = context - 1 (room for one new token)
    max_num_tokens: int     # BuildConfig.max_num_tokens
    tensor_parallel: int
    pipeline_parallel: int

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


def engine_shape(spec: DeploymentSpec, hf_config: dict) -> EngineShape:
    context = resolve_context_size(spec.context_size, hf_config, spec.name)
    if spec.max_num_tokens is not None:
        if spec.max_num_tokens < 1:
            raise InvalidArgumentError(f"{spec.name}: max_num_tokens must be at least 1")
        tokens = spec.max_num_tokens
    else:
        tokens = max(context, min(DEFAULT_MAX_NUM_TOKENS, spec.max_batch_size * context))
    return EngineShape(spec.max_batch_size, context, context - 1, tokens,
                       spec.tensor_parallel, spec.pipeline_parallel)


@dataclass(frozen=True)
class Quantization:
    """One precision in TensorRT-LLM terms (from backends.contract.precisions) plus the spec's KV choice."""

    precision: str
    dtype: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None

    @property
    def needs_calibration(self) -> bool:
        """QuantConfig._requires_calibration: FP8 weights or any quantized KV cache."""
        return self.quant_algo == "FP8" or self.kv_cache_quant_algo is not None

    def describe(self) -> str:
        weights = {None: "fp16 weights", "W8A16": "int8 weight-only (W8A16, per channel)",
                   "W4A16": "int4 weight-only (W4A16, per channel)", "FP8": "FP8 weights"}[self.quant_algo]
        kv = f", {self.kv_cache_quant_algo} KV cache" if self.kv_cache_quant_algo else ""
        return f"dtype {self.dtype}, {weights}{kv}"


def quantization_for(spec: DeploymentSpec, precision: str) -> Quantization:
    p = PRECISIONS[precision]
    kv = p.trtllm_kv_cache_quant_algo
    if precision == "int8" and spec.int8_kv_cache:
        kv = "INT8"
    return Quantization(precision, p.trtllm_dtype, p.trtllm_quant_algo, kv)


# -- calibration data -------------------------------------------------------------------------

_REMOTE_CALIBRATION_SETS = ("cnn_dailymail", "pileval")   # names quantize_by_modelopt resolves itself


def calibration_source(spec: DeploymentSpec) -> str | None:
    """None (the built-in set), a local file/dir, or a dataset name TensorRT-LLM 1.2 resolves."""
    src = spec.calibration_dataset
    if not src or src == "default":
        return None
    if Path(src).expanduser().exists():
        return str(Path(src).expanduser().resolve())
    if any(name in src for name in _REMOTE_CALIBRATION_SETS):
        return src
    raise InvalidArgumentError(
        f"{spec.name}: calibration dataset {src!r} is neither a local .jsonl/.txt file or directory nor a "
        f"dataset TensorRT-LLM {TRTLLM_SERIES} knows ({', '.join(_REMOTE_CALIBRATION_SETS)}): point it at "
        "a file of texts, or leave it unset for the built-in set")


def _texts_from_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else data.get("text", [])
    else:  # .jsonl
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    texts = [r if isinstance(r, str) else r.get("text") for r in rows]
    return [t for t in texts if isinstance(t, str) and t.strip()]


def write_calibration_set(source: str | None, out_dir: str | Path) -> Path:
    """Write `out_dir/train.jsonl` ({"text": ...} rows), the layout quantize_and_export loads from a
    local directory (`load_dataset(dir, split="train")["text"]`). Runs on the build host."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if source is None:
        texts = list(DEFAULT_CALIBRATION_TEXTS)
    else:
        path = Path(source)
        try:
            texts = _texts_from_file(path)
        except (OSError, ValueError, AttributeError) as e:
            raise BuildError(f"calibration file {path} is unreadable ({e}): use one text per line "
                             "(.txt) or {\"text\": ...} rows (.jsonl)") from None
        if not texts:
            raise BuildError(f"calibration file {path} holds no texts: add at least one non-empty line")
    with open(out / "train.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return out


# -- the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ApiCall:
    """A call into TensorRT-LLM's Python API (or ours), kept as data for the contract tests."""

    function: str                       # dotted name, e.g. tensorrt_llm.quantization.quantize_and_export
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One build step: a command line, or a short Python program made of API calls."""

    title: str
    argv: tuple[str, ...] = ()
    code: str = ""
    calls: tuple[ApiCall, ...] = ()

    def command(self, python: str = sys.executable) -> list[str]:
        return list(self.argv) if self.argv else [python, "-c", self.code]

    def describe(self) -> list[str] | str:
        """What plan() returns for this step: the argv, or the Python it runs."""
        return list(self.argv) if self.argv else self.code

    def shell(self) -> str:
        if self.argv:
            return shlex.join(self.argv)
        return f"python3 - <<'EOF'\n{self.code.rstrip()}\nEOF"


def _py(value: Any) -> str:
    return repr(value)


def _kwargs_src(kwargs: dict[str, Any], raw: frozenset[str] = frozenset()) -> str:
    """Keyword arguments as source; names in `raw` are expressions, the rest literals."""
    return ", ".join(f"{k}={v if k in raw else _py(v)}" for k, v in kwargs.items())


def _calibration_step(source: str | None, out_dir: Path) -> Step:
    call = ApiCall("builder.build.engines.tensorrt_llm.write_calibration_set",
                   {"source": source, "out_dir": str(out_dir)})
    code = ("from builder.build.engines.tensorrt_llm import write_calibration_set\n"
            f"write_calibration_set({_kwargs_src(call.kwargs)})\n")
    what = "built-in calibration texts" if source is None else source
    return Step(f"calibration set ({what})", code=code, calls=(call,))


def _convert_step(q: Quantization, shape: EngineShape, hf_dir: Path, ckpt: Path) -> Step:
    """Checkpoint without calibration: from_hugging_face + save_checkpoint, once per rank."""
    qc_kwargs = {"quant_algo": q.quant_algo} if q.quant_algo else {}
    mapping = ApiCall("tensorrt_llm.mapping.Mapping", {
        "world_size": shape.world_size, "rank": "rank",
        "tp_size": shape.tensor_parallel, "pp_size": shape.pipeline_parallel})
    quant_config = ApiCall("tensorrt_llm.models.modeling_utils.QuantConfig", qc_kwargs)
    convert = ApiCall("tensorrt_llm.models.LLaMAForCausalLM.from_hugging_face", {
        "hf_model_or_dir": str(hf_dir), "dtype": q.dtype, "mapping": "mapping", "quant_config": "quant_config"})
    save = ApiCall("tensorrt_llm.models.LLaMAForCausalLM.save_checkpoint",
                   {"output_dir": str(ckpt), "save_config": "(rank == 0)"})
    qc_src = ", ".join(f"{k}=QuantAlgo.{v}" for k, v in qc_kwargs.items())
    code = (
        "from tensorrt_llm.mapping import Mapping\n"
        "from tensorrt_llm.models import LLaMAForCausalLM\n"
        "from tensorrt_llm.models.modeling_utils import QuantConfig\n"
        "from tensorrt_llm.quantization import QuantAlgo\n"
        f"quant_config = QuantConfig({qc_src})\n"
        f"for rank in range({shape.world_size}):\n"
        f"    mapping = Mapping({_kwargs_src(mapping.kwargs, frozenset({'rank'}))})\n"
        f"    model = LLaMAForCausalLM.from_hugging_face("
        f"{_kwargs_src(convert.kwargs, frozenset({'mapping', 'quant_config'}))})\n"
        f"    model.save_checkpoint({_kwargs_src(save.kwargs, frozenset({'save_config'}))})\n"
        "    del model\n")
    return Step(f"TensorRT-LLM checkpoint ({q.describe()})", code=code,
                calls=(mapping, quant_config, convert, save))


def quantize_kwargs(q: Quantization, shape: EngineShape, hf_dir: Path, ckpt: Path,
                    calib: str, calib_size: int) -> dict[str, Any]:
    """quantize_and_export's keyword arguments (the same names as quantize.py's flags)."""
    return {
        "model_dir": str(hf_dir), "device": "cuda", "calib_dataset": calib, "dtype": q.dtype,
        "qformat": _MODELOPT_QFORMAT[q.quant_algo], "kv_cache_dtype": _MODELOPT_KV_DTYPE[q.kv_cache_quant_algo],
        "calib_size": calib_size, "batch_size": 1,
        "calib_max_seq_length": min(CALIBRATION_MAX_SEQ_LEN, shape.max_seq_len),
        "awq_block_size": 128, "output_dir": str(ckpt),
        "tp_size": shape.tensor_parallel, "pp_size": shape.pipeline_parallel, "cp_size": 1,
        "seed": 1234, "tokenizer_max_seq_length": max(2048, shape.max_seq_len),
    }


def _quantize_step(q: Quantization, shape: EngineShape, hf_dir: Path, ckpt: Path,
                   calib: str, calib_size: int) -> Step:
    call = ApiCall("tensorrt_llm.quantization.quantize_and_export",
                   quantize_kwargs(q, shape, hf_dir, ckpt, calib, calib_size))
    code = ("from tensorrt_llm.quantization import quantize_and_export\n"
            f"quantize_and_export({_kwargs_src(call.kwargs)})\n")
    return Step(f"ModelOpt calibration + TensorRT-LLM checkpoint ({q.describe()})", code=code, calls=(call,))


def trtllm_build_argv(q: Quantization, shape: EngineShape, ckpt: Path, engine_dir: Path,
                      workers: int = 1) -> list[str]:
    # FP8 GEMMs come from the checkpoint's Q/DQ scales; the GEMM plugin stays off for them
    # (it only covers non-quantized GEMMs), on for fp16 and weight-only engines.
    gemm = "disable" if q.quant_algo == "FP8" else "auto"
    return [
        "trtllm-build",
        "--checkpoint_dir", str(ckpt),
        "--output_dir", str(engine_dir),
        "--max_batch_size", str(shape.max_batch_size),
        "--max_input_len", str(shape.max_input_len),
        "--max_seq_len", str(shape.max_seq_len),
        "--max_num_tokens", str(shape.max_num_tokens),
        "--max_beam_width", "1",
        "--kv_cache_type", "paged",
        "--gpt_attention_plugin", "auto",
        "--gemm_plugin", gemm,
        "--remove_input_padding", "enable",
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable",
        "--workers", str(workers),
        "--log_level", "info",
    ]


def steps(spec: DeploymentSpec, precision: str, hf_dir: Path, engine_dir: Path,
          work_dir: Path | None = None, workers: int = 1) -> list[Step]:
    """Every step that builds `precision` of `spec` into `engine_dir`, as data."""
    if spec.kind != "llm":
        raise InvalidArgumentError(f"{spec.name} is an {spec.kind} model: TensorRT-LLM builds LLMs "
                                   "(embeddings use builder.build.engines.tensorrt_encoder)")
    if precision not in GPU_PRECISIONS:
        raise BuildError(f"{precision} is CPU-only: choose from {', '.join(GPU_PRECISIONS)} for --engine tensorrt-llm")
    hf_dir, engine_dir = Path(hf_dir), Path(engine_dir)
    check_architecture(hf_dir)
    shape = engine_shape(spec, read_hf_config(hf_dir))
    q = quantization_for(spec, precision)
    work = Path(work_dir) if work_dir else default_work_dir(spec, precision)
    ckpt = work / "checkpoint"
    out: list[Step] = []
    if q.needs_calibration:
        source = calibration_source(spec)
        if source is None or Path(source).is_file():
            calib_dir = work / "calibration"
            out.append(_calibration_step(source, calib_dir))
            calib = str(calib_dir)
            size = len(DEFAULT_CALIBRATION_TEXTS) if source is None else DEFAULT_CALIBRATION_SIZE
        else:
            calib, size = source, DEFAULT_CALIBRATION_SIZE
        out.append(_quantize_step(q, shape, hf_dir, ckpt, calib, size))
    else:
        out.append(_convert_step(q, shape, hf_dir, ckpt))
    out.append(Step(f"trtllm-build ({shape.world_size} rank(s), context {shape.max_seq_len}, "
                    f"batch {shape.max_batch_size}, {shape.max_num_tokens} tokens/step)",
                    argv=tuple(trtllm_build_argv(q, shape, ckpt, engine_dir, workers))))
    return out


def default_work_dir(spec: DeploymentSpec, precision: str) -> Path:
    """Where the intermediate checkpoint lives (never inside the model repository)."""
    return Path(tempfile.gettempdir()) / "serverless-triton-trtllm" / f"{spec.name}-{precision}"


def plan(spec: DeploymentSpec, precision: str, hf_dir: Path, engine_dir: Path) -> list[list[str] | str]:
    """The exact steps: argv lists (commands) and Python programs (API calls), in order."""
    return [s.describe() for s in steps(spec, precision, hf_dir, engine_dir)]


def engine_dir_in(repository: Path, dep: DeploymentName) -> Path:
    """Repository layout: the engine files live under the engine model's version directory."""
    return Path(repository) / dep.llm_engine / "1" / "engine"


def plan_text(spec: DeploymentSpec, hf_dir: Path, repository: Path, precisions: list[str] | None = None) -> str:
    """The full build plan per precision, as shell a person can read or run (`--dry-run`)."""
    lines = [f"# TensorRT-LLM {TRTLLM_SERIES}.x build plan for {spec.name} ({Path(hf_dir)})"]
    for precision in precisions or spec.precisions:
        dep = DeploymentName(spec.name, precision)
        engine_dir = engine_dir_in(repository, dep)
        q = quantization_for(spec, precision)
        need = PRECISIONS[precision].min_compute_capability if precision in GPU_PRECISIONS else None
        need_text = f"; needs compute capability >= {need[0]}.{need[1]}" if need else ""
        lines += ["", f"## {dep} -> Triton model {dep.llm_engine} ({q.describe()}{need_text})"]
        plan_steps = steps(spec, precision, hf_dir, engine_dir)
        for i, step in enumerate(plan_steps, 1):
            lines += [f"# {i}. {step.title}", step.shell()]
        lines.append(f"# {len(plan_steps) + 1}. render {dep.llm_engine}/config.pbtxt (backend tensorrtllm, "
                     f"gpt_model_path {engine_dir.relative_to(repository).as_posix()})")
    return "\n".join(lines) + "\n"


# -- running the plan on a GPU host -----------------------------------------------------------

def _check_toolchain() -> tuple[str, str]:
    trtllm = tensorrt_llm_version()
    if trtllm is None:
        raise BuildError("tensorrt_llm is not installed here: build GPU engines inside the image from "
                         "docker/Dockerfile.gpu (TensorRT-LLM 1.2.x), see docs/gpu.md")
    if not trtllm.startswith(TRTLLM_SERIES + "."):
        raise BuildError(f"TensorRT-LLM {trtllm} is installed, but engines are built with {TRTLLM_SERIES}.x "
                         "(later releases dropped the TensorRT engine backend): use docker/Dockerfile.gpu")
    trt = tensorrt_version()
    if trt is None:
        raise BuildError("cannot tell the TensorRT version on this host: install the tensorrt Python "
                         "package or set TRT_VERSION (the NGC TensorRT-LLM images set it)")
    return trtllm, trt


def _run_step(step: Step, log: Path, run: Callable) -> None:
    with open(log, "a") as f:
        f.write(f"\n### {step.title}\n{step.shell()}\n")
        f.flush()
        result = run(step.command(), stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise BuildError(f"{step.title} failed (exit {result.returncode}): the last lines of {log} say why")


def _engine_files(engine_dir: Path, world_size: int) -> list[Path]:
    files = [engine_dir / "config.json"] + [engine_dir / f"rank{r}.engine" for r in range(world_size)]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise BuildError(f"trtllm-build finished but {engine_dir} lacks {', '.join(missing)}: "
                         "see the build log; rebuild with more GPU memory or a smaller context")
    return files


def prepare_gpu_build(precision: str, engine_dir: Path, gpu: GpuInfo | None, what: str,
                      check: Callable[[str, GpuInfo], None], work: Path) -> tuple[GpuInfo, Path, Path]:
    """The checks and folders every GPU build starts with: (gpu, empty work dir, empty log)."""
    gpu = gpu or host_gpu()
    if gpu is None:
        raise BuildError(f"no NVIDIA GPU found on this host (nvidia-smi lists none): build {what} on a GPU "
                         "host, or use --engine cpu")
    check(precision, gpu)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    Path(engine_dir).mkdir(parents=True, exist_ok=True)
    log = work.parent / f"{work.name}.log"
    log.write_text("")
    return gpu, work, log


def build(spec: DeploymentSpec, precision: str, hf_dir: Path, engine_dir: Path, *,
          gpu: GpuInfo | None = None, run: Callable = subprocess.run, keep_work_dir: bool = False) -> dict:
    """Run the plan on this GPU host; return the manifest `engine` entry for the engine."""
    engine_dir = Path(engine_dir)
    gpu, work, log = prepare_gpu_build(precision, engine_dir, gpu, "TensorRT-LLM engines", check_precision_supported,
                                       default_work_dir(spec, precision))
    trtllm, trt = _check_toolchain()
    plan_steps = steps(spec, precision, hf_dir, engine_dir, work, workers=1)
    for step in plan_steps:
        _run_step(step, log, run)
    shape = engine_shape(spec, read_hf_config(hf_dir))
    _engine_files(engine_dir, shape.world_size)
    built_version = json.loads((engine_dir / "config.json").read_text()).get("version", trtllm)
    if not keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return engine_entry(spec, precision, shape, gpu, built_version, trt)


def engine_entry(spec: DeploymentSpec, precision: str, shape: EngineShape, gpu: GpuInfo,
                 trtllm: str, trt: str) -> dict:
    """The manifest `engine` dict: what was built, how, and for which GPU and TensorRT."""
    q = quantization_for(spec, precision)
    calib = None
    if q.needs_calibration:
        calib = calibration_source(spec) or "built-in"
    return {
        "target": TARGET,
        "format": ENGINE_FORMAT,
        "version": trtllm,
        "tensorrt_llm_version": trtllm,
        "tensorrt_version": trt,
        "gpu_arch": {"compute_capability": gpu.cc, "sm": gpu.sm, "name": gpu.name, "family": gpu.family},
        "build_image": os.environ.get("SERVERLESS_TRITON_GPU_IMAGE"),   # set by docker/Dockerfile.gpu
        "quantization": {"precision": precision, "dtype": q.dtype, "quant_algo": q.quant_algo,
                         "kv_cache_quant_algo": q.kv_cache_quant_algo, "calibration": calib},
        "context_size": shape.max_seq_len,
        "max_input_len": shape.max_input_len,
        "max_batch_size": shape.max_batch_size,
        "max_num_tokens": shape.max_num_tokens,
        "tensor_parallel": shape.tensor_parallel,
        "pipeline_parallel": shape.pipeline_parallel,
        "world_size": shape.world_size,
    }


# -- the Triton model -------------------------------------------------------------------------

def xgrammar_tokenizer_info(hf_dir: Path) -> dict:
    """What the tensorrtllm backend's guided decoding reads from `xgrammar_tokenizer_info_path`
    (encoded_vocab, tokenizer_str, stop_token_ids): the content TensorRT-LLM's
    examples/generate_xgrammar_tokenizer_info.py writes (tensorrt_llm.llmapi.tokenizer.
    _xgrammar_tokenizer_info for a fast tokenizer), made from tokenizer.json without TensorRT-LLM,
    so any build host can write it."""
    from backends.tokenization import ModelTokenizer

    try:
        tok = ModelTokenizer.load(Path(hf_dir))
    except (OSError, ValueError) as e:
        raise SourceError(f"{hf_dir}: the tokenizer (tokenizer.json) is unreadable ({e}): re-download the model") from None
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    return {"encoded_vocab": [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])],
            "tokenizer_str": tok.tokenizer.to_str(),
            "stop_token_ids": [tok.eos_token_id]}


def write_xgrammar_tokenizer_info(hf_dir: Path, path: Path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(xgrammar_tokenizer_info(hf_dir)))
    return Path(path)


def _check_relative(engine_dir_rel: str) -> str:
    p = Path(engine_dir_rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise InvalidArgumentError(
            f"engine path {engine_dir_rel!r} must be relative to the repository root (e.g. "
            "name-fp16-engine/1/engine), so a pulled repository works anywhere")
    return p.as_posix()


def render_engine_config(dep: DeploymentName, spec: DeploymentSpec, engine_dir_rel: str, *,
                         context_size: int | None = None, max_num_tokens: int | None = None,
                         kv_cache_free_gpu_mem_fraction: float = KV_CACHE_FREE_GPU_MEM_FRACTION,
                         exclude_input_in_output: bool = True,
                         tokenizer_info_rel: str | None = None) -> str:
    """config.pbtxt text of the stock `tensorrtllm` model: in-flight fused batching, paged KV
    cache, decoupled streaming, xgrammar guided decoding; every value filled (StrictUndefined
    fails on a missing one). `tokenizer_info_rel` (default: `<engine model>/1/xgrammar_tokenizer_info.json`)
    is relative to the repository root, like the engine path."""
    if not 0.0 < kv_cache_free_gpu_mem_fraction <= 1.0:
        raise InvalidArgumentError("kv_cache_free_gpu_mem_fraction must be in (0, 1]: e.g. 0.9")
    context = context_size or spec.context_size
    tokens = max_num_tokens or spec.max_num_tokens
    # Prompts longer than one step's token budget need chunked context (paged context FMHA is on).
    chunked = bool(context and tokens and tokens < context - 1)
    return render_config(
        "tensorrt_llm",
        name=dep.llm_engine,
        max_batch_size=spec.max_batch_size,
        decoupled=True,
        gpt_model_path=_check_relative(engine_dir_rel),
        batching_strategy="inflight_fused_batching",
        batch_scheduler_policy="guaranteed_no_evict",
        kv_cache_free_gpu_mem_fraction=kv_cache_free_gpu_mem_fraction,
        enable_chunked_context=chunked,
        exclude_input_in_output=exclude_input_in_output,
        max_beam_width=1,
        max_queue_delay_microseconds=0,
        xgrammar_tokenizer_info_path=_check_relative(tokenizer_info_rel or f"{dep.llm_engine}/1/{XGRAMMAR_TOKENIZER_INFO}"),
    )


def render_engine_model(dep: DeploymentName, spec: DeploymentSpec, engine_dir_rel: str, model_dir: Path,
                        **options: Any) -> None:
    """Write `model_dir/config.pbtxt` and the version directory `model_dir/1/`.

    `engine_dir_rel` is relative to the repository root (`model_dir`'s parent). When the engine is
    already there, its build config decides the context size and token budget the config states.
    """
    model_dir = Path(model_dir)
    built = _engine_build_config(model_dir.parent / _check_relative(engine_dir_rel))
    options.setdefault("context_size", built.get("max_seq_len"))
    options.setdefault("max_num_tokens", built.get("max_num_tokens"))
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(render_engine_config(dep, spec, engine_dir_rel, **options))


def _engine_build_config(engine_dir: Path) -> dict:
    """build_config of a built engine (its config.json), or {} when there is none yet."""
    try:
        return json.loads((engine_dir / "config.json").read_text()).get("build_config", {}) or {}
    except (OSError, ValueError, AttributeError):
        return {}


# -- the engine target ------------------------------------------------------------------------

def build_deployment(job: BuildJob, *, gpu: GpuInfo | None = None, run: Callable = subprocess.run) -> BuiltDeployment:
    """The stock tensorrtllm engine model between the same preprocessing, postprocessing and
    ensemble as the CPU engine. Accuracy against fp32 needs the GPU: scripts/gpu_check.py."""
    dep, spec, w, hf_dir = job.dep, job.spec, job.writer, job.ckpt.hf_dir
    models = w.write_llm_shared(dep, hf_dir, job.context_size, spec.max_batch_size)
    model_dir = w.fresh_model_dir(dep.llm_engine)
    with job.step(f"building the TensorRT-LLM {job.precision} engine"):
        info = build(spec, job.precision, hf_dir, model_dir / "1" / "engine", gpu=gpu, run=run)
    render_engine_model(dep, spec, f"{dep.llm_engine}/1/engine", model_dir)
    write_xgrammar_tokenizer_info(hf_dir, model_dir / "1" / XGRAMMAR_TOKENIZER_INFO)
    models.append(dep.llm_engine)
    models += w.write_llm_front(dep, hf_dir, spec.max_batch_size)
    return BuiltDeployment(models, {"infer": dep.llm, "stream": dep.llm_stream}, info,
                           {"reference": "fp32", "method": "scripts/gpu_check.py on the GPU host"})


def format_plan(spec: DeploymentSpec, ckpt: Checkpoint, context_size: int, output: Path, cache_dir: Path) -> str:
    return plan_text(spec, ckpt.hf_dir, Path(output)).rstrip("\n")
