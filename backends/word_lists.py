"""Stop and bad words in tensorrtllm's word-list layout ([2, L] int32: row 0 the concatenated
token ids, row 1 the end offset of each word, padded with -1), both ways.

A module of its own so the engine, which only reads the layout, imports neither the tokenizer
nor jinja2 (preprocessing's imports): its model's import 82-110 -> 43-56 ms on an AVX2 host, on
the engine's load, which every LLM cold start waits for."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from backends.errors import RequestError

if TYPE_CHECKING:
    from backends.tokenization import ModelTokenizer


def words_to_list(tok: ModelTokenizer, words: list[str]) -> np.ndarray:
    """Words -> the [2, L] layout. No words -> [[0], [-1]]."""
    ids: list[int] = []
    offsets: list[int] = []
    for w in words:
        ids.extend(tok.encode(w, add_special_tokens=False))
        offsets.append(len(ids))
    if not ids:
        return np.array([[0], [-1]], dtype=np.int32)
    offsets += [-1] * (len(ids) - len(offsets))
    return np.array([ids, offsets], dtype=np.int32)


def list_to_words(flat: np.ndarray) -> list[list[int]]:
    """Inverse of words_to_list, as the engine reads it."""
    flat = np.asarray(flat).reshape(2, -1)
    ids, offsets = flat[0].tolist(), [o for o in flat[1].tolist() if o >= 0]
    out, start = [], 0
    for end in offsets:
        if end < start or end > len(ids):
            raise RequestError("stop_words_list/bad_words_list offsets are malformed")
        out.append(ids[start:end])
        start = end
    return [w for w in out if w]
