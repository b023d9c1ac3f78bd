"""CPU LLM engines on OpenVINO: one fp32 export per checkpoint, then one engine per precision.

The fp32 IR (optimum-intel's export, stateful, with OpenVINO tokenizers) is the reference; the
other precisions are derived from it, so torch runs once per checkpoint:
fp16 weights (compress_to_fp16), int8 weight-only (nncf INT8_ASYM, per channel, no calibration),
fp8 e4m3 weights (nncf FP8_E4M3). All compute at f32 at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from builder.engines.openvino_common import (MODEL_BIN, MODEL_XML, cached_export, derive, enforce_floor,  # noqa: F401
                                             export_fp32, quantization_of)
from builder.precisions import PRECISIONS

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


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean cosine of two [positions, vocab] logit arrays."""
    top1 = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
    cos = (reference * candidate).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1))
    return {"top1_agreement": round(top1, 6), "mean_logit_cosine": round(float(cos.mean()), 6)}


def check_floor(precision: str, figures: dict[str, float]) -> dict[str, float]:
    """The floor this precision must meet; raises BuildError (engine not published) below it."""
    p = PRECISIONS[precision]
    return enforce_floor("engine", precision, figures,
                         {"top1_agreement": p.llm_min_top1, "mean_logit_cosine": p.llm_min_cosine})


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
