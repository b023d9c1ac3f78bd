"""Tokenize: texts -> encoder inputs, truncated to the model's max length and padded to the
longest text of each request (backends/embedding.py)."""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from backends import triton_io as io
from backends.contract.tensors import TEXT, TRUNCATE
from backends.embedding import EmbeddingTokenizer, decode_texts, truncate_flags


class TritonPythonModel:
    def initialize(self, args):
        self.max_texts = int(io.parameters(args)["max_texts"])
        self.tokenizer = EmbeddingTokenizer.load(Path(args["model_repository"]) / args["model_version"] / "tokenizer")

    def _one(self, r):
        texts = decode_texts(io.strings(r, TEXT), self.max_texts)
        feeds = self.tokenizer.encode(texts, truncate_flags(io.array(r, TRUNCATE), len(texts)))
        return pb_utils.InferenceResponse(io.tensors(feeds, batch=False))

    def execute(self, requests):
        return [io.guarded("embedding tokenize", self._one, r) for r in requests]
