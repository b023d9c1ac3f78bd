"""CPU LLM engines on OpenVINO: one fp32 export per checkpoint, then one engine per precision.

The fp32 IR (optimum-intel's export, stateful, with OpenVINO tokenizers) is the reference; the
other precisions are derived from it, so torch runs once per checkpoint:
fp16 weights (compress_to_fp16), int8 weight-only (nncf INT8_ASYM, per channel, no calibration),
fp8 e4m3 weights (nncf FP8_E4M3). All compute at f32 at run time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from builder.errors import BuildError
from builder.precisions import PRECISIONS

MODEL_XML = "openvino_model.xml"
MODEL_BIN = "openvino_model.bin"

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


def quantization_of(precision: str) -> str:
    return PRECISIONS[precision].openvino


def export_reference(hf_dir: Path, out_dir: Path, log_path: Path) -> Path:
    """optimum-intel's fp32 export (a subprocess: torch's memory goes when it ends)."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino",
           "--model", str(hf_dir), "--task", "text-generation-with-past", "--weight-format", "fp32",
           str(tmp)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not (tmp / MODEL_XML).exists():
        tail = " | ".join(Path(log_path).read_text(errors="replace").strip().splitlines()[-3:])
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(f"the OpenVINO export of {hf_dir} failed ({tail}); full log: {log_path}")
    os.replace(tmp, out_dir)
    return out_dir


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def derive(reference: Path, precision: str, out_dir: Path) -> Path:
    """Write the engine of one precision from the fp32 reference IR."""
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

    if precision == "int8":
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:  # fp8 per output channel: nncf's default groups of 128 fail on layers narrower than that
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.FP8_E4M3, group_size=-1, ratio=1.0)
    ov.save_model(model, out_dir / MODEL_XML, compress_to_fp16=False)
    return out_dir


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


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean cosine of two [positions, vocab] logit arrays."""
    top1 = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
    cos = (reference * candidate).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1))
    return {"top1_agreement": round(top1, 6), "mean_logit_cosine": round(float(cos.mean()), 6)}


def check_floor(precision: str, figures: dict[str, float]) -> dict[str, float]:
    """The floor this precision must meet; raises BuildError (engine not published) below it."""
    p = PRECISIONS[precision]
    floor = {"top1_agreement": p.llm_min_top1, "mean_logit_cosine": p.llm_min_cosine}
    failed = [f"{k} {figures[k]:.4f} < {v}" for k, v in floor.items() if figures[k] < v]
    if failed:
        raise BuildError(f"the {precision} engine misses its accuracy floor against fp32 ({', '.join(failed)}): "
                         "it was not published; choose another precision or check the checkpoint")
    return floor


def engine_info(precision: str, context_size: int, max_batch_size: int) -> dict:
    import openvino as ov
    import openvino_genai as og

    return {
        "target": "cpu",
        "format": "openvino-ir",
        "version": f"openvino {ov.__version__.split('-')[0]}, openvino-genai {og.__version__.split('-')[0]}",
        "quantization": quantization_of(precision),
        "compute": "f32",
        "context_size": context_size,
        "max_batch_size": max_batch_size,
    }
