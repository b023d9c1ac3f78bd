"""Pooling: token embeddings -> one vector per text, pooled and normalized as the model's
sentence-transformers configuration says (1/embedding.json; backends/embedding.py)."""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from backends import triton_io as io
from backends.contract.tensors import EMBEDDING, TOKEN_EMBEDDINGS
from backends.embedding import EmbeddingConfig, sentence_embeddings


class TritonPythonModel:
    def initialize(self, args):
        self.config = EmbeddingConfig.load(Path(args["model_repository"]) / args["model_version"])

    def _one(self, r):
        vectors = sentence_embeddings(io.array(r, TOKEN_EMBEDDINGS), io.array(r, "attention_mask"), self.config)
        return pb_utils.InferenceResponse([pb_utils.Tensor(EMBEDDING, vectors)])

    def execute(self, requests):
        return [io.guarded("embedding pooling", self._one, r) for r in requests]
