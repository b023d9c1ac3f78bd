"""Preprocessing: a client request (plain values) -> the engine's inputs.

One place validates everything a client sends, for either engine: prompt or chat messages,
max_tokens against the context size, sampling ranges, penalties, structured output (guided
decoding), stop and bad words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from backends.context import fit_chat, fit_prompt
from backends.errors import RequestError
from backends.guided import check_guide, check_penalties
from backends.sampling import check_sampling
from backends.tokenization import ModelTokenizer, parse_messages
from backends.word_lists import words_to_list


@dataclass
class ClientRequest:
    """The ensemble inputs as plain Python values (None = not sent)."""

    text_input: bytes | None = None
    messages: bytes | None = None
    max_tokens: int | None = None
    stop_words: list[bytes] = field(default_factory=list)
    bad_words: list[bytes] = field(default_factory=list)
    end_id: int | None = None
    pad_id: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    random_seed: int | None = None
    stream: bool = False
    truncate: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    guided_decoding_guide_type: bytes | None = None
    guided_decoding_guide: bytes | None = None


def utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{what} is not valid UTF-8 (bad byte at position {e.start}): send UTF-8 text") from None


def preprocess(tok: ModelTokenizer, req: ClientRequest, context_size: int) -> dict[str, np.ndarray]:
    """Validate and tokenize one request; raises RequestError with what to fix."""
    if req.max_tokens is None:
        raise RequestError("max_tokens is required: say how many tokens to generate")
    if req.text_input is not None and req.messages is not None:
        raise RequestError("send either text_input or messages, not both")
    if req.messages is not None:
        messages = parse_messages(utf8(req.messages, "messages"))
        fitted = fit_chat(messages, tok.encode_chat, req.max_tokens, context_size, req.truncate)
    elif req.text_input is not None:
        text = utf8(req.text_input, "text_input")
        if not text.strip():
            raise RequestError("text_input is empty: send a prompt")
        fitted = fit_prompt(tok.encode(text), req.max_tokens, context_size, req.truncate)
    else:
        raise RequestError("no prompt: send text_input (or messages for chat)")
    sampling = check_sampling(req.top_k, req.top_p, req.temperature, req.random_seed)
    penalties = check_penalties(req.presence_penalty, req.frequency_penalty)
    guide = check_guide(req.guided_decoding_guide_type, req.guided_decoding_guide)
    if guide is not None and req.end_id == -1:
        raise RequestError("end_id -1 (never stop at the end token) cannot be combined with guided decoding: the "
                           "output ends at the end token once the JSON is complete; drop end_id")
    stop = [utf8(w, "stop_words") for w in req.stop_words if w]
    bad = [utf8(w, "bad_words") for w in req.bad_words if w]
    if req.end_id is not None and not (req.end_id == -1 or 0 <= req.end_id < tok.vocab_size):
        raise RequestError(f"end_id {req.end_id} is not a token id of this model (-1: never stop at an end token)")
    if req.pad_id is not None and not 0 <= req.pad_id < tok.vocab_size:
        raise RequestError(f"pad_id {req.pad_id} is not a token id of this model")

    def one(value, dtype):
        return np.array([value], dtype=dtype)

    return {
        "INPUT_ID": np.array(fitted.ids, dtype=np.int32),
        "REQUEST_INPUT_LEN": one(len(fitted.ids), np.int32),
        "REQUEST_OUTPUT_LEN": one(fitted.max_tokens, np.int32),
        "OUT_END_ID": one(req.end_id if req.end_id is not None else tok.eos_token_id, np.int32),
        "OUT_PAD_ID": one(req.pad_id if req.pad_id is not None else tok.pad_token_id, np.int32),
        "STOP_WORDS_IDS": words_to_list(tok, stop),
        "BAD_WORDS_IDS": words_to_list(tok, bad),
        "OUT_TOP_K": one(sampling.top_k, np.int32),
        "OUT_TOP_P": one(sampling.top_p, np.float32),
        "OUT_TEMPERATURE": one(sampling.temperature, np.float32),
        "OUT_RANDOM_SEED": one(sampling.seed, np.uint64),
        "OUT_STREAMING": one(bool(req.stream), np.bool_),
        "OUT_PRESENCE_PENALTY": one(penalties.presence, np.float32),
        "OUT_FREQUENCY_PENALTY": one(penalties.frequency, np.float32),
        "OUT_GUIDE_TYPE": np.array([guide.type.encode() if guide else b""], dtype=object),
        "OUT_GUIDE": np.array([guide.guide.encode() if guide else b""], dtype=object),
        "PROMPT_TOKENS": one(len(fitted.ids), np.int32),
        "NOTICE": np.array([fitted.notice.encode()], dtype=object),
    }
