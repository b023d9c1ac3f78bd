"""Postprocessing: engine output ids -> text, for whole answers and for streams.

Whole answers (the ensemble) are stateless. A stream is one `TextStream` per request, held by the
streaming model for the request's lifetime; the engine sends only the new tokens of a stream in
each response (as tensorrtllm does), and TextStream turns them into text safe to show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from backends.detokenize import Decoder, StreamDetokenizer, detokenize


@dataclass
class Chunk:
    text: str
    completion_tokens: int
    finish_reason: str   # "" while a stream goes on; stop | length at its end


def finish_reason(ids: list[int], count: int, end_id: int, max_tokens: int, stopped: bool) -> str:
    if stopped or (ids and ids[-1] == end_id):
        return "stop"
    return "length" if count >= max_tokens else "stop"


def whole(decoder: Decoder, ids: list[int], end_id: int, max_tokens: int, stop_words: list[str]) -> Chunk:
    text, stopped = detokenize(decoder, ids, stop_words)
    return Chunk(text, len(ids), finish_reason(ids, len(ids), end_id, max_tokens, stopped))


@dataclass
class TextStream:
    decoder: Decoder
    end_id: int
    max_tokens: int
    stop_words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.detok = StreamDetokenizer(self.decoder, self.stop_words)

    @property
    def stopped(self) -> bool:
        """A stop string was found: the rest of the generation is not shown (cancel it)."""
        return self.detok.stopped

    def add(self, new_ids: list[int]) -> Chunk:
        return Chunk(self.detok.add(new_ids), self.detok.tokens, "")

    def end(self) -> Chunk:
        text = self.detok.finish()
        d = self.detok
        return Chunk(text, d.tokens, finish_reason(d.ids, d.tokens, self.end_id, self.max_tokens, d.stopped))
