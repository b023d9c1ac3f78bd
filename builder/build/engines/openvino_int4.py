"""The int4 CPU LLM engine's weights: nncf grouped int4 with AWQ and scale estimation.

Data-free int4 (nncf INT4_SYM/ASYM, any group size) reached only 0.65-0.70 teacher-forced top-1
against fp32 on SmolLM2-135M; AWQ (activation-aware channel scales) plus scale estimation, fed a
few fixed prompts through the model's own tokenizer, lift it by 4-5 points at the same size. The
embedding/lm_head (tied in SmolLM2) stays int8 per channel, nncf's backup mode: at int4 it costs
far more accuracy than it saves bytes. The recipe and the measurements behind it:
backends/contract/precisions.py (INT4_*) and docs/llm-deployments.md ("int4").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backends.contract.precisions import INT4_GROUP_SIZE, INT4_RATIO, INT4_SYMMETRIC
from backends.tokenization import ModelTokenizer

# A few varied texts (chat turns, code, prose, numbers) whose activations guide AWQ and scale
# estimation; the accuracy check's own text (openvino_llm.ACCURACY_TEXT) is deliberately not among them.
CALIBRATION_TEXTS = (
    ("<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
     "Once upon a time, on a rocky island far from the coast, there lived an old lighthouse keeper named Tom."),
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
     "The capital of France is Paris, which is also its largest city."),
    ("Photosynthesis converts light energy into chemical energy stored in glucose. Plants, algae and some "
     "bacteria use it."),
    ("<|im_start|>user\nExplain how a rainbow forms.<|im_end|>\n<|im_start|>assistant\n"
     "A rainbow forms when sunlight enters raindrops, bends, reflects inside them and splits into colours."),
    ("The stock market fell 3% on Tuesday after the central bank raised interest rates by half a point, the "
     "largest increase since 2000."),
    ("<|im_start|>user\nList three tips for better sleep.<|im_end|>\n<|im_start|>assistant\n"
     "1. Keep a regular schedule. 2. Avoid screens before bed. 3. Keep your room cool and dark."),
    ("Dear team, the meeting on Thursday is moved to 3 pm in room 204. Please bring the quarterly figures "
     "and your questions."),
)


def _sample(tokenizer: ModelTokenizer, text: str) -> dict[str, np.ndarray]:
    """One input of the stateful export (a fresh sequence: positions from 0, beam 0)."""
    ids = tokenizer.encode(text)
    n = len(ids)
    return {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None], "beam_idx": np.zeros(1, dtype=np.int32)}


def compress(model, reference: Path):
    """The int4 model of the fp32 reference IR `model` (read from `reference`, whose tokenizer
    files the calibration prompts go through)."""
    import nncf

    tokenizer = ModelTokenizer.load(reference)
    dataset = nncf.Dataset([_sample(tokenizer, t) for t in CALIBRATION_TEXTS])
    mode = nncf.CompressWeightsMode.INT4_SYM if INT4_SYMMETRIC else nncf.CompressWeightsMode.INT4_ASYM
    return nncf.compress_weights(model, mode=mode, group_size=INT4_GROUP_SIZE, ratio=INT4_RATIO, dataset=dataset,
                                 awq=True, scale_estimation=True)
