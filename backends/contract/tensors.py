"""The tensor contract, in one place: names, dtypes and dims of every LLM and embedding model role.

Names follow tensorrtllm_backend's all_models/inflight_batcher_llm so the GPU engine is the stock
`tensorrtllm` backend and clients written for it work unchanged. Every model has
`max_batch_size` > 0 like inflight_batcher_llm, so dims below exclude the batch dimension and a
client sends text_input with shape [1, 1]. Extensions of our own are optional and marked.

The config templates in model_repository/ are rendered from these lists (see
builder/build/repository.py), so a name cannot drift between a template and the code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str          # Triton config type, e.g. "TYPE_INT32"
    dims: tuple[int, ...]
    optional: bool = False
    ours: bool = False  # an extension of ours, not in inflight_batcher_llm
    ragged: bool = False  # allow_ragged_batch: requests padded to different lengths batch together

    @property
    def dims_text(self) -> str:
        return "[ " + ", ".join(str(d) for d in self.dims) + " ]"


T = TensorSpec

# What clients send to the ensemble / front model.
ENSEMBLE_INPUTS = (
    T("text_input", "TYPE_STRING", (1,), optional=True),   # optional: `messages` may replace it
    T("max_tokens", "TYPE_INT32", (1,)),
    T("bad_words", "TYPE_STRING", (-1,), optional=True),
    T("stop_words", "TYPE_STRING", (-1,), optional=True),
    T("end_id", "TYPE_INT32", (1,), optional=True),
    T("pad_id", "TYPE_INT32", (1,), optional=True),
    T("top_k", "TYPE_INT32", (1,), optional=True),
    T("top_p", "TYPE_FP32", (1,), optional=True),
    T("temperature", "TYPE_FP32", (1,), optional=True),
    T("random_seed", "TYPE_UINT64", (1,), optional=True),
    T("stream", "TYPE_BOOL", (1,), optional=True),
    # OpenAI's penalties (-2..2) and structured output, stock tensorrtllm names (backends/guided.py)
    T("presence_penalty", "TYPE_FP32", (1,), optional=True),
    T("frequency_penalty", "TYPE_FP32", (1,), optional=True),
    T("guided_decoding_guide_type", "TYPE_STRING", (1,), optional=True),   # json | json_schema
    T("guided_decoding_guide", "TYPE_STRING", (1,), optional=True),        # the JSON schema
    T("messages", "TYPE_STRING", (1,), optional=True, ours=True),   # JSON list of {role, content}
    T("truncate", "TYPE_BOOL", (1,), optional=True, ours=True),
)

ENSEMBLE_OUTPUTS = (
    T("text_output", "TYPE_STRING", (-1,)),
    T("prompt_tokens", "TYPE_INT32", (1,), ours=True),
    T("completion_tokens", "TYPE_INT32", (1,), ours=True),
    T("finish_reason", "TYPE_STRING", (1,), ours=True),     # "" while streaming, then stop|length
    T("notice", "TYPE_STRING", (1,), ours=True),            # truncation / max_tokens clamp, or ""
)

# Engine (tensorrtllm backend names). The CPU engine implements this subset. `stop` with the
# request id of a live request ends it (how the streaming model cancels for a departed client).
ENGINE_INPUTS = (
    T("input_ids", "TYPE_INT32", (-1,)),
    T("input_lengths", "TYPE_INT32", (1,)),
    T("request_output_len", "TYPE_INT32", (1,)),
    T("end_id", "TYPE_INT32", (1,), optional=True),
    T("pad_id", "TYPE_INT32", (1,), optional=True),
    T("stop_words_list", "TYPE_INT32", (2, -1), optional=True),
    T("bad_words_list", "TYPE_INT32", (2, -1), optional=True),
    T("runtime_top_k", "TYPE_INT32", (1,), optional=True),
    T("runtime_top_p", "TYPE_FP32", (1,), optional=True),
    T("temperature", "TYPE_FP32", (1,), optional=True),
    T("seed", "TYPE_UINT64", (1,), optional=True),
    T("streaming", "TYPE_BOOL", (1,), optional=True),
    T("stop", "TYPE_BOOL", (1,), optional=True),
    T("presence_penalty", "TYPE_FP32", (1,), optional=True),
    T("frequency_penalty", "TYPE_FP32", (1,), optional=True),
    # "" (none) or json_schema after preprocessing; the CPU engine also takes json, the GPU one all
    # of TensorRT-LLM's guide types (its guided decoding with xgrammar)
    T("guided_decoding_guide_type", "TYPE_STRING", (1,), optional=True),
    T("guided_decoding_guide", "TYPE_STRING", (1,), optional=True),
)

ENGINE_OUTPUTS = (
    T("output_ids", "TYPE_INT32", (-1, -1)),
    T("sequence_length", "TYPE_INT32", (-1,)),
)

# Preprocessing: every ensemble input in (it validates them all, for either engine), engine inputs
# out, plus what postprocessing needs to finish a response.
PREPROCESSING_INPUTS = ENSEMBLE_INPUTS
PREPROCESSING_OUTPUTS = (
    T("INPUT_ID", "TYPE_INT32", (-1,)),
    T("REQUEST_INPUT_LEN", "TYPE_INT32", (1,)),
    T("REQUEST_OUTPUT_LEN", "TYPE_INT32", (1,)),
    T("OUT_END_ID", "TYPE_INT32", (1,)),
    T("OUT_PAD_ID", "TYPE_INT32", (1,)),
    T("STOP_WORDS_IDS", "TYPE_INT32", (2, -1)),
    T("BAD_WORDS_IDS", "TYPE_INT32", (2, -1)),
    T("OUT_TOP_K", "TYPE_INT32", (1,)),
    T("OUT_TOP_P", "TYPE_FP32", (1,)),
    T("OUT_TEMPERATURE", "TYPE_FP32", (1,)),
    T("OUT_RANDOM_SEED", "TYPE_UINT64", (1,)),
    T("OUT_STREAMING", "TYPE_BOOL", (1,)),
    T("OUT_PRESENCE_PENALTY", "TYPE_FP32", (1,), ours=True),
    T("OUT_FREQUENCY_PENALTY", "TYPE_FP32", (1,), ours=True),
    T("OUT_GUIDE_TYPE", "TYPE_STRING", (1,), ours=True),     # "" when the request has no guide
    T("OUT_GUIDE", "TYPE_STRING", (1,), ours=True),
    T("PROMPT_TOKENS", "TYPE_INT32", (1,), ours=True),
    T("NOTICE", "TYPE_STRING", (1,), ours=True),
)

# Which preprocessing output feeds which engine input (the ensemble and the streaming model both
# use this map, so the two paths cannot drift apart).
PREPROCESSING_TO_ENGINE = {
    "INPUT_ID": "input_ids", "REQUEST_INPUT_LEN": "input_lengths", "REQUEST_OUTPUT_LEN": "request_output_len",
    "OUT_END_ID": "end_id", "OUT_PAD_ID": "pad_id", "STOP_WORDS_IDS": "stop_words_list",
    "BAD_WORDS_IDS": "bad_words_list", "OUT_TOP_K": "runtime_top_k", "OUT_TOP_P": "runtime_top_p",
    "OUT_TEMPERATURE": "temperature", "OUT_RANDOM_SEED": "seed", "OUT_STREAMING": "streaming",
    "OUT_PRESENCE_PENALTY": "presence_penalty", "OUT_FREQUENCY_PENALTY": "frequency_penalty",
    "OUT_GUIDE_TYPE": "guided_decoding_guide_type", "OUT_GUIDE": "guided_decoding_guide",
}

POSTPROCESSING_INPUTS = (
    T("TOKENS_BATCH", "TYPE_INT32", (-1, -1)),
    T("SEQUENCE_LENGTH", "TYPE_INT32", (-1,)),
    T("END_ID", "TYPE_INT32", (1,), ours=True),
    T("REQUEST_OUTPUT_LEN", "TYPE_INT32", (1,), ours=True),
    T("STOP_WORDS", "TYPE_STRING", (-1,), optional=True, ours=True),
    T("PROMPT_TOKENS", "TYPE_INT32", (1,), ours=True),
    T("NOTICE", "TYPE_STRING", (1,), ours=True),
)

POSTPROCESSING_OUTPUTS = (
    T("OUTPUT", "TYPE_STRING", (-1,)),
    T("PROMPT_TOKENS_OUT", "TYPE_INT32", (1,), ours=True),
    T("COMPLETION_TOKENS", "TYPE_INT32", (1,), ours=True),
    T("FINISH_REASON", "TYPE_STRING", (1,), ours=True),
    T("NOTICE_OUT", "TYPE_STRING", (1,), ours=True),
)

# The ensemble (not decoupled): preprocessing -> engine call -> postprocessing. The engine call is a
# thin non-decoupled adapter over the decoupled engine (Triton lets no step after a decoupled model
# take inputs from elsewhere, and plain `infer` needs a non-decoupled model).
# Steps: (model role, {model tensor: ensemble tensor} for inputs, same for outputs).
ENSEMBLE_STEPS = (
    ("preprocessing",
     {t.name: t.name for t in PREPROCESSING_INPUTS},
     {t.name: f"_{t.name.lower()}" for t in PREPROCESSING_OUTPUTS}),
    ("engine_call",
     {engine: f"_{pre.lower()}" for pre, engine in PREPROCESSING_TO_ENGINE.items()},
     {"output_ids": "_output_ids", "sequence_length": "_sequence_length"}),
    ("postprocessing",
     {"TOKENS_BATCH": "_output_ids", "SEQUENCE_LENGTH": "_sequence_length", "END_ID": "_out_end_id",
      "REQUEST_OUTPUT_LEN": "_request_output_len", "STOP_WORDS": "stop_words", "PROMPT_TOKENS": "_prompt_tokens",
      "NOTICE": "_notice"},
     {"OUTPUT": "text_output", "PROMPT_TOKENS_OUT": "prompt_tokens", "COMPLETION_TOKENS": "completion_tokens",
      "FINISH_REASON": "finish_reason", "NOTICE_OUT": "notice"}),
)


# -- embedding deployments: tokenize -> encoder (pooling inside on CPU; after a TensorRT encoder a
# -- pooling model of its own), and the ensemble clients call -----------------------------------------
# Every text is one batch row (dims exclude it), so Triton's dynamic batchers merge concurrent requests.

TEXT, TRUNCATE, EMBEDDING, TOKEN_EMBEDDINGS = "text", "truncate", "embedding", "token_embeddings"
EMBEDDING_ROLES = ("tokenize", "encoder", "pooling", "ensemble")


def embedding_tensors(encoder_inputs: tuple[str, ...], hidden_size: int,
                      dimension: int) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    """{role: (inputs, outputs)} of one embedding deployment's models."""
    token_inputs = tuple(T(n, "TYPE_INT64", (-1,), ragged=True) for n in encoder_inputs)
    client_inputs = (T(TEXT, "TYPE_STRING", (1,)), T(TRUNCATE, "TYPE_BOOL", (1,), optional=True))
    token_embeddings = T(TOKEN_EMBEDDINGS, "TYPE_FP32", (-1, hidden_size), ragged=True)
    embedding = T(EMBEDDING, "TYPE_FP32", (dimension,))
    return {
        "tokenize": (client_inputs, tuple(T(t.name, t.dtype, t.dims) for t in token_inputs)),
        "encoder": (token_inputs, (T(TOKEN_EMBEDDINGS, "TYPE_FP32", (-1, hidden_size)),)),
        "pooling": ((token_embeddings, T("attention_mask", "TYPE_INT64", (-1,), ragged=True)), (embedding,)),
        "ensemble": (client_inputs, (embedding,)),
    }
