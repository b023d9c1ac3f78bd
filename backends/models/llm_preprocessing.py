"""Preprocessing: tokenize, apply the chat template, fit the context, validate sampling."""

from pathlib import Path

import triton_python_backend_utils as pb_utils

from backends import triton_io as io
from backends.preprocess import ClientRequest, preprocess
from backends.tokenization import ModelTokenizer


class TritonPythonModel:
    def initialize(self, args):
        params = io.parameters(args)
        self.context_size = int(params["context_size"])
        self.tokenizer = ModelTokenizer.load(Path(args["model_repository"]) / args["model_version"] / "tokenizer")

    def _one(self, r):
        req = ClientRequest(
            text_input=io.one_string(r, "text_input"),
            messages=io.one_string(r, "messages"),
            max_tokens=io.scalar(r, "max_tokens", int),
            stop_words=io.strings(r, "stop_words"),
            bad_words=io.strings(r, "bad_words"),
            end_id=io.scalar(r, "end_id", int),
            pad_id=io.scalar(r, "pad_id", int),
            top_k=io.scalar(r, "top_k", int),
            top_p=io.scalar(r, "top_p", float),
            temperature=io.scalar(r, "temperature", float),
            random_seed=io.scalar(r, "random_seed", int),
            stream=bool(io.scalar(r, "stream", bool)),
            truncate=bool(io.scalar(r, "truncate", bool)),
            presence_penalty=io.scalar(r, "presence_penalty", float),
            frequency_penalty=io.scalar(r, "frequency_penalty", float),
            guided_decoding_guide_type=io.one_string(r, "guided_decoding_guide_type"),
            guided_decoding_guide=io.one_string(r, "guided_decoding_guide"),
        )
        return pb_utils.InferenceResponse(io.tensors(preprocess(self.tokenizer, req, self.context_size)))

    def execute(self, requests):
        return [io.guarded("preprocessing", self._one, r) for r in requests]
