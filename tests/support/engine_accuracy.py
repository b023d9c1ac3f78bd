"""The tests' own measurement of an LLM engine against its fp32 reference, written apart from the
builder's (builder/build/engines/openvino_runtime.py), so a test can check the figures the build
recorded instead of trusting them. Run as a module to measure inside a process whose
ONEDNN_MAX_CPU_ISA caps the kernels (stdin: JSON job, stdout: JSON figures)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def decode_logits(engine_dir: Path, ids: list[int], properties: dict[str, str], step: int) -> np.ndarray:
    """Logits of every position, feeding `step` tokens per inference through the stateful model."""
    import openvino as ov

    request = ov.Core().compile_model(Path(engine_dir) / "openvino_model.xml", "CPU", properties).create_infer_request()
    rows = []
    for start in range(0, len(ids), step):
        chunk = np.asarray([ids[start:start + step]], dtype=np.int64)
        request.infer({"input_ids": chunk, "attention_mask": np.ones((1, start + chunk.shape[1]), dtype=np.int64),
                       "position_ids": np.arange(start, start + chunk.shape[1], dtype=np.int64)[None],
                       "beam_idx": np.array([0], dtype=np.int32)})
        rows.extend(np.array(request.get_tensor("logits").data[0]))
    return np.stack(rows)


def figures(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    same = [int(np.argmax(r) == np.argmax(c)) for r, c in zip(reference, candidate, strict=True)]
    cosines = [float(r @ c / (np.sqrt(r @ r) * np.sqrt(c @ c))) for r, c in
               zip(reference.astype(np.float64), candidate.astype(np.float64), strict=True)]
    return {"top1_agreement": sum(same) / len(same), "mean_logit_cosine": sum(cosines) / len(cosines)}


def measure(reference_dir: Path, engine_dir: Path, ids: list[int], properties: dict[str, str], step: int = 16) -> dict:
    exact = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    return figures(decode_logits(reference_dir, ids, exact, len(ids)), decode_logits(engine_dir, ids, properties, step))


if __name__ == "__main__":
    job = json.loads(sys.stdin.read())
    print(json.dumps(measure(Path(job["reference"]), Path(job["engine"]), job["ids"], job["properties"])))
