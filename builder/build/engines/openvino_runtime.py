"""Per-ISA runtime settings of a CPU LLM engine, chosen by measurement at build time.

For every ISA class up to the build host's own (backends.cpu_isa), the candidates of
backends.cpu_runtime.candidates are measured fastest first against the fp32 reference, and the
first that passes the precision's floors is recorded in the engine's SETTINGS_FILE; the engine
picks its host's entry at load. Weaker classes are measured on the same host in a subprocess with
ONEDNN_MAX_CPU_ISA set to the class's weakest member: oneDNN's primitives and the CPU plugin's own
JIT kernels then use only that ISA (verified: oneDNN reports "isa:Intel AVX2"; a bf16 hint under
that cap fails, so bf16 is only a candidate where the class computes bf16 natively).

The measurement decodes the fixed text in chunks of CHUNK tokens through the stateful model, so
every logit after the first chunk reads its past from the KV cache at the candidate's precision
(one pass over the whole text would score the cache's effect only partly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from backends.contract.precisions import PRECISIONS
from backends.cpu_isa import ONEDNN_CAP, classes_up_to, cpu_flags, isa_class
from backends.cpu_runtime import REFERENCE, SETTINGS_FILE, RuntimeSetting, candidates
from backends.errors import BuildError

CHUNK = 16
MEASURE_TIMEOUT_S = 900
# classes measured at once: each subprocess spends much of its time in single-threaded work (start,
# imports, the CPU plugin's graph rewrites in compile_model), so two overlap well even on 2 cores
# (SmolLM2 int8, 3 classes: 12.4 s -> 7.7 s alone, ~5 s with the reference computed once; same figures)
PARALLEL_CLASSES = 2
_reference_logits: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean cosine of two [positions, vocab] logit arrays."""
    top1 = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
    cos = (reference * candidate).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1))
    return {"top1_agreement": round(top1, 6), "mean_logit_cosine": round(float(cos.mean()), 6)}


def logits(engine_dir: Path, ids: list[int], setting: RuntimeSetting, chunk: int = 0) -> np.ndarray:
    """Logits at every position of ids under a runtime setting: one pass (chunk 0), or chunk
    tokens at a time with the past read back from the stateful model's KV cache."""
    import openvino as ov

    compiled = ov.Core().compile_model(Path(engine_dir) / "openvino_model.xml", "CPU", setting.properties())
    request = compiled.create_infer_request()
    step = chunk or len(ids)
    out = []
    for start in range(0, len(ids), step):
        part = ids[start:start + step]
        request.infer({"input_ids": np.array([part], dtype=np.int64),
                       "attention_mask": np.ones((1, start + len(part)), dtype=np.int64),
                       "position_ids": np.arange(start, start + len(part), dtype=np.int64)[None],
                       "beam_idx": np.zeros(1, dtype=np.int32)})
        out.append(request.get_tensor("logits").data[0].copy())
    return np.concatenate(out)


def passes(precision: str, figures: dict[str, float]) -> bool:
    p = PRECISIONS[precision]
    return figures["top1_agreement"] >= p.llm_min_top1 and figures["mean_logit_cosine"] >= p.llm_min_cosine


def _reason(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return lines[0][:200] if lines else type(error).__name__


def reference_logits(reference: Path, ids: list[int]) -> np.ndarray:
    """The fp32 reference's logits at the reference setting, computed once per build process."""
    key = (str(reference), tuple(ids))
    if key not in _reference_logits:
        _reference_logits[key] = logits(reference, ids, REFERENCE)
    return _reference_logits[key]


def measure_class(reference: Path, engine_dir: Path, ids: list[int], precision: str, cls: str,
                  ref: np.ndarray | None = None) -> dict:
    """The first (fastest) candidate of this class that passes the floors, measured in this
    process (whose ONEDNN_MAX_CPU_ISA the caller set), with the figures of those that failed.
    `ref`: the reference's logits when the caller has them (measure_settings computes them once on
    the build host's own kernels; a capped class's fp32 logits differ from them by float rounding
    only, which test_cpu_runtime checks by re-measuring each class against a capped reference)."""
    ref = logits(reference, ids, REFERENCE) if ref is None else ref
    refused = []
    for setting in candidates(cls, precision):
        try:
            figures = agreement(ref, logits(engine_dir, ids, setting, CHUNK))
        except RuntimeError as e:  # kernels this class lacks (int8 dynamic quantization under AVX2)
            if setting == REFERENCE:
                raise
            refused.append({**setting.properties(), "unavailable": _reason(e)})
            continue
        if passes(precision, figures):
            return {"compute": setting.compute, "kv_cache": setting.kv_cache,
                    "dynamic_quantization": setting.dynamic_quantization, **figures, "refused": refused}
        refused.append({**setting.properties(), **figures})
    raise BuildError(f"no runtime setting of the {precision} engine passes its accuracy floors on {cls} hosts, "
                     f"not even f32 compute with an f32 KV cache ({refused[-1]}): choose another precision")


def measure_settings(reference: Path, engine_dir: Path, ids: list[int], precision: str) -> dict:
    """The per-class table for SETTINGS_FILE: every class up to this host's, each measured in a
    subprocess capped to it (PARALLEL_CLASSES at once), against the reference's logits computed
    once here."""
    host = isa_class(cpu_flags(), os.environ.get("ONEDNN_MAX_CPU_ISA"))
    table = {"precision": precision, "build_host_class": host,
             "method": f"teacher-forced logits of the fixed text against fp32, decoded {CHUNK} tokens at a time "
                       "through the KV cache; classes below the build host's measured under ONEDNN_MAX_CPU_ISA",
             "classes": {}}
    if precision == "fp32":
        return table
    classes = classes_up_to(host)
    with tempfile.TemporaryDirectory(prefix="reference-logits-") as tmp:
        ref_file = Path(tmp) / "reference.npy"
        np.save(ref_file, reference_logits(reference, ids))
        with ThreadPoolExecutor(PARALLEL_CLASSES) as pool:
            results = list(pool.map(lambda cls: _measure_capped(reference, engine_dir, ids, precision, cls, ref_file),
                                    classes))
    table["classes"] = dict(zip(classes, results))
    return table


def _measure_capped(reference: Path, engine_dir: Path, ids: list[int], precision: str, cls: str,
                    ref_file: Path) -> dict:
    job = json.dumps({"reference": str(reference), "engine": str(engine_dir), "ids": ids, "precision": precision,
                      "class": cls, "reference_logits": str(ref_file)})
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": ONEDNN_CAP[cls]}
    proc = subprocess.run([sys.executable, "-m", __name__], check=False, input=job, capture_output=True, text=True,
                          env=env, timeout=MEASURE_TIMEOUT_S)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
        if "BuildError" in proc.stderr:
            raise BuildError(tail.split("BuildError: ", 1)[-1])
        raise BuildError(f"measuring the {precision} engine's runtime settings on {cls} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_settings(engine_dir: Path, table: dict) -> Path:
    path = Path(engine_dir) / SETTINGS_FILE
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def summary(table: dict) -> dict:
    """What the manifest records: each class's chosen setting and figures (not the refused ones)."""
    return {cls: {k: v for k, v in entry.items() if k != "refused"} for cls, entry in table["classes"].items()}


if __name__ == "__main__":  # one class, in a process capped to it (measure_settings)
    args = json.loads(sys.stdin.read())
    result = measure_class(Path(args["reference"]), Path(args["engine"]), args["ids"], args["precision"],
                           args["class"], np.load(args["reference_logits"]) if args.get("reference_logits") else None)
    print(json.dumps(result))
