"""Postprocessing (the ensemble's last step): detokenize a whole answer, trim stop strings,
report token counts and why generation ended."""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from backends import triton_io as io
from backends.postprocess import whole
from backends.preprocess import utf8
from backends.tokenization import ModelTokenizer


class TritonPythonModel:
    def initialize(self, args):
        self.tok = ModelTokenizer.load(Path(args["model_repository"]) / args["model_version"] / "tokenizer")

    def _one(self, r):
        length = int(io.array(r, "SEQUENCE_LENGTH").reshape(-1)[0])
        ids = io.array(r, "TOKENS_BATCH").reshape(-1)[:length].tolist()
        stops = [utf8(w, "stop_words") for w in io.strings(r, "STOP_WORDS") if w]
        chunk = whole(self.tok, ids, io.scalar(r, "END_ID", int), io.scalar(r, "REQUEST_OUTPUT_LEN", int), stops)
        return pb_utils.InferenceResponse(io.tensors({
            "OUTPUT": np.array([chunk.text.encode()], dtype=object),
            "PROMPT_TOKENS_OUT": io.array(r, "PROMPT_TOKENS").reshape(1).astype(np.int32),
            "COMPLETION_TOKENS": np.array([chunk.completion_tokens], dtype=np.int32),
            "FINISH_REASON": np.array([chunk.finish_reason.encode()], dtype=object),
            "NOTICE_OUT": io.array(r, "NOTICE").reshape(1),
        }))

    def execute(self, requests):
        return [io.guarded("postprocessing", self._one, r) for r in requests]
