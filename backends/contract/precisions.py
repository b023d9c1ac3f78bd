"""The precision table (DESIGN.md section 3): what each suffix means on each engine target,
and the accuracy floors an engine must meet before it is published.

Floors were measured on this machine class (see docs/embeddings.md and docs/llm-deployments.md); an engine below its floor
is refused by the builder, never shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.errors import InvalidArgumentError


@dataclass(frozen=True)
class Precision:
    name: str
    # CPU engine (OpenVINO): how weights are stored (LLMs; encoders group their int8 weights:
    # openvino_encoder.INT8_GROUP_SIZE). LLMs compute at f32; encoders: openvino_encoder.COMPUTE.
    openvino: str
    # TensorRT-LLM: dtype and quantization algorithm (None = no quantization).
    trtllm_dtype: str | None
    trtllm_quant_algo: str | None
    trtllm_kv_cache_quant_algo: str | None
    min_compute_capability: tuple[int, int] | None
    # LLM floors against the fp32 reference: teacher-forced top-1 agreement, mean logit cosine.
    llm_min_top1: float
    llm_min_cosine: float
    # Embedding floors against the fp32 reference: min and mean cosine over the fixed sentences.
    embedding_min_cosine: float
    embedding_mean_cosine: float
    description: str
    # False: the encoder builders refuse it (int4 misses the embedding floors; docs/llm-deployments.md)
    embeddings: bool = True


# int4's recipe and floors (builder/build/engines/openvino_int4.py), measured on SmolLM2-135M-Instruct
# against fp32, teacher-forced top-1 / logit cosine (docs/llm-deployments.md, "int4"): data-free
# INT4_ASYM g64 0.702/0.900, INT4_SYM g64 0.693/0.918, g32 0.698/0.933; with AWQ + scale
# estimation INT4_SYM g64 0.744/0.945, INT4_ASYM g64 0.772/0.952 (chosen; 82 MiB of weights).
INT4_SYMMETRIC = False        # asymmetric: a zero point per group, 3 points of top-1 over symmetric
INT4_GROUP_SIZE = 64          # divides 576 and 1536 (SmolLM2's widths); nncf's default 128 does not
INT4_RATIO = 1.0              # every layer int4 but the embedding/lm_head (int8)
INT4_MIN_TOP1 = 0.72          # refuses data-free int4 (0.70) and anything worse
INT4_MIN_COSINE = 0.93

PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "fp32 weights (the reference)", None, None, None, None,
                  1.0, 0.99999, 0.99999, 0.99999,
                  "unquantized reference; CPU only"),
        # TensorRT-LLM 1.2 supports Ampere (8.0) and newer; FP8 needs Ada/Hopper/Blackwell (8.9+).
        Precision("fp16", "fp16 weights", "float16", None, None, (8, 0),
                  0.99, 0.9999, 0.9999, 0.9999,
                  "half-precision weights"),
        Precision("int8", "int8 weight-only, asymmetric, per channel (nncf INT8_ASYM)", "float16", "W8A16", None,
                  (8, 0), 0.95, 0.998, 0.99, 0.999,
                  "8-bit weight-only quantization, no calibration"),
        Precision("fp8", "fp8 e4m3 weights with scales (nncf FP8_E4M3)", "float16", "FP8", "FP8", (8, 9),
                  0.85, 0.99, 0.985, 0.996,
                  "8-bit float weights (and KV cache on GPU)"),
        # int4: weights in groups of INT4_GROUP_SIZE input channels with a scale and zero point each
        # (nncf INT4_ASYM with AWQ + scale estimation on a few fixed prompts); the embedding/lm_head
        # stays int8. GPU: weight-only int4 per channel (QuantAlgo.W4A16, no calibration).
        # LLMs only: MiniLM's int4 embeddings miss any useful floor (docs/llm-deployments.md).
        Precision("int4", f"int4 weight-only, asymmetric, groups of {INT4_GROUP_SIZE} input channels "
                          "(nncf INT4_ASYM, AWQ + scale estimation); embedding/lm_head int8", "float16", "W4A16",
                  None, (8, 0), INT4_MIN_TOP1, INT4_MIN_COSINE, 0.0, 0.0,
                  "4-bit grouped weight-only quantization", embeddings=False),
    )
}
LLM_ONLY = tuple(name for name, p in PRECISIONS.items() if not p.embeddings)

DEFAULT_PRECISIONS = ("fp16", "int8", "fp8")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"unknown precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    return precision


def parse_precisions(value: str) -> list[str]:
    """Parse `fp16,int8` into a de-duplicated list, refusing unknown names."""
    names = [p.strip() for p in value.split(",") if p.strip()]
    if not names:
        raise InvalidArgumentError(f"no precision given: choose from {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(check_precision(p) for p in names))
