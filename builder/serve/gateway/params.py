"""OpenAI sampling parameters -> the Triton ensemble's JSON fields.

Defaults follow OpenAI's (temperature 1, top_p 1), not Triton's (greedy), so a client that
leaves them out gets what it would get from OpenAI. Parameters older repositories lack (penalties,
response_format) are sent only when set to a non-default value, and only to a model whose
configuration declares that input: Triton ignores unknown JSON fields, and silently ignoring a
penalty is worse than refusing it.

response_format becomes the engine's guided decoding (backends/guided.py, tensorrtllm_backend's
input names): `json_object` -> guided_decoding_guide_type "json" (any JSON object, no guide);
`json_schema` -> "json_schema" with the schema as guided_decoding_guide (no schema: "json");
`text` -> nothing.
"""

from __future__ import annotations

import json
from typing import Any

from builder.serve.gateway.errors import bad_request, unsupported
from builder.serve.gateway.schemas import MAX_STOP, ChatCompletionRequest, CompletionRequest, ResponseFormat, Sampling

MAX_SEED = 2**63   # Triton's random_seed is uint64, our engines take 0..2**63-1
DEFAULT_TEMPERATURE = 1.0
# Triton inputs a repository built before they existed lacks -> the OpenAI parameter that needs them.
ENGINE_EXTRAS = {
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "guided_decoding_guide_type": "response_format",
    "guided_decoding_guide": "response_format",
}


def stop_words(stop: str | list[str] | None) -> list[str]:
    words = [stop] if isinstance(stop, str) else list(stop or [])
    if len(words) > MAX_STOP:
        raise bad_request(f"stop holds {len(words)} strings; at most {MAX_STOP} are allowed", "stop")
    return [w for w in words if w]


def refuse_unsupported(req: Sampling) -> None:
    """400 for every parameter we accept in the schema but cannot honour with a non-default value."""
    if req.logit_bias:
        raise unsupported("logit_bias", "the engines take no per-token biases")
    if req.logprobs not in (None, False, 0) or req.top_logprobs not in (None, 0):
        raise unsupported("logprobs" if req.logprobs not in (None, False, 0) else "top_logprobs",
                          "the engines do not return log-probabilities")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if isinstance(req, ChatCompletionRequest):
        if req.tools or req.functions or req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
            raise unsupported("tools" if req.tools or req.tool_choice not in (None, "none") else "functions",
                              "tool and function calls are not available on these deployments")
        if req.modalities not in (None, ["text"]):
            raise unsupported("modalities", "these deployments produce text only")
        if req.reasoning_effort is not None:
            raise unsupported("reasoning_effort", "these models do not reason in a separate channel")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise unsupported("suffix", "the engines do not fill in the middle")
        if req.best_of not in (None, 1) and req.best_of != (req.n or 1):
            raise unsupported("best_of", "the engines return no log-probabilities to rank candidates; use n")


def sampling_body(req: Sampling) -> dict[str, Any]:
    """The Triton JSON fields for sampling, stop and the engine extras (no prompt, no max_tokens)."""
    body: dict[str, Any] = {}
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    body["temperature"] = temperature
    if req.top_p == 0.0:
        body["top_k"] = 1                       # only the most likely token: greedy
    elif req.top_p is not None:
        body["top_p"] = req.top_p
    if req.top_k is not None and "top_k" not in body:
        body["top_k"] = max(req.top_k, 0)
    words = stop_words(req.stop)
    if words:
        body["stop_words"] = words
    if req.truncate:
        body["truncate"] = True
    if req.presence_penalty:
        body["presence_penalty"] = req.presence_penalty
    if req.frequency_penalty:
        body["frequency_penalty"] = req.frequency_penalty
    body.update(guide_fields(getattr(req, "response_format", None)))
    return body


def guide_fields(fmt: ResponseFormat | None) -> dict[str, str]:
    """response_format -> the guided-decoding fields (none for text)."""
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"guided_decoding_guide_type": "json"}
    spec = fmt.json_schema
    if not isinstance(spec, dict):
        raise bad_request("response_format.json_schema is required for type json_schema: send "
                          '{"name": ..., "schema": {...}}', "response_format.json_schema")
    schema = spec.get("schema")
    if schema is None:
        return {"guided_decoding_guide_type": "json"}       # OpenAI: no schema = any JSON object
    if not isinstance(schema, dict):
        raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                          "response_format.json_schema.schema")
    return {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": json.dumps(schema)}


def extras_in(body: dict[str, Any]) -> list[str]:
    """The Triton inputs of `body` that older repositories lack."""
    return [k for k in ENGINE_EXTRAS if k in body]


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """One seed per choice: seed, seed+1, ... (reproducible and distinct); none: random each."""
    if seed is None:
        return [None] * n
    return [(seed + i) % MAX_SEED for i in range(n)]


def with_seed(body: dict[str, Any], seed: int | None) -> dict[str, Any]:
    return body if seed is None else {**body, "random_seed": seed}
