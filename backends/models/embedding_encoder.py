"""Encoder: token ids -> one pooled, normalized vector per text, on OpenVINO. Every request the
dynamic batcher hands over runs together, in length-sorted chunks (backends/embedding.py:
encode_batches). Pooling happens here rather than in a model of its own (as it does after a
TensorRT encoder): one process and one hop fewer per deployment, and a [dimension] vector per text
crosses into the ensemble instead of [tokens, hidden]."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from backends import triton_io as io
from backends.contract.tensors import EMBEDDING
from backends.cpu_isa import host_isa_class
from backends.embedding import (EmbeddingConfig, OpenVinoEncoder, check_encoder_inputs, encode_batches,
                               sentence_embeddings)
from backends.metrics import ModelMetrics


class TritonPythonModel:
    def initialize(self, args):
        params = io.parameters(args)
        version = Path(args["model_repository"]) / args["model_version"]
        engine = version / "engine" / "openvino_model.xml"
        self.config = EmbeddingConfig.load(version)
        self.encoder = OpenVinoEncoder(engine, params["inference_precision"])
        pb_utils.Logger.log_info(f"encoder {args['model_name']} runtime: compute={params['inference_precision']} "
                                 f"weights={'expanded to f32 at load' if self.encoder.weights_expanded else 'as stored'} "
                                 f"isa_class={host_isa_class()} compiled_blob={self.encoder.imported}")
        self.chunk = (int(params["chunk_texts"]), int(params["chunk_tokens"]))
        self.inputs = [t["name"] for t in json.loads(args["model_config"])["input"]]
        self.metrics = ModelMetrics(args["model_name"])

    def _checked(self, r):
        return check_encoder_inputs({name: io.array(r, name) for name in self.inputs})

    def _pooled(self, hidden, mask):
        return pb_utils.InferenceResponse([pb_utils.Tensor(EMBEDDING, sentence_embeddings(hidden, mask, self.config))])

    def execute(self, requests):
        responses = [io.guarded("embedding encoder", self._checked, r) for r in requests]
        valid = [i for i, checked in enumerate(responses) if isinstance(checked, dict)]
        if valid:  # one encoder pass for every valid request of this batch
            feeds = [responses[i] for i in valid]
            outputs = io.guarded("embedding encoder", encode_batches, feeds, self.encoder, *self.chunk)
            for k, i in enumerate(valid):   # pooled per request: one request's error stays its own
                responses[i] = (io.guarded("embedding pooling", self._pooled, outputs[k], feeds[k]["attention_mask"])
                                if isinstance(outputs, list) else outputs)
            if isinstance(outputs, list) and self.metrics.on:   # texts and tokens the encoder saw
                self.metrics.embedded(sum(f["attention_mask"].shape[0] for f in feeds),
                                      int(sum(f["attention_mask"].sum() for f in feeds)))
        return responses
