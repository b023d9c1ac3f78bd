"""Detokenization: whole outputs, and streams that arrive a few tokens at a time.

Streaming keeps two offsets into the ids seen so far (the vLLM scheme): text is decoded from a
short window that starts a few tokens back, so spaces that a tokenizer attaches to the next token
are not lost, and nothing is emitted while the window ends in an incomplete UTF-8 sequence (U+FFFD).
Stop strings are trimmed from the output; text that could be the start of a stop string is held
back until the next tokens decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def find_stop(text: str, stop_words: list[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop_words if s) if i >= 0]
    return min(hits) if hits else -1


def partial_stop_len(text: str, stop_words: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stop_words:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def detokenize(decoder: Decoder, ids: list[int], stop_words: list[str]) -> tuple[str, bool]:
    """Whole output: (text trimmed at the first stop string, whether one was found)."""
    text = decoder.decode(ids)
    cut = find_stop(text, stop_words)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class StreamDetokenizer:
    """State of one stream: feed it new ids, get back the text that is safe to show."""

    decoder: Decoder
    stop_words: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    held: str = ""          # decoded but not yet emitted (could start a stop string)
    stopped: bool = False
    tokens: int = 0

    def _decode_new(self) -> str:
        prefix = self.decoder.decode(self.ids[self.prefix_offset:self.read_offset])
        window = self.decoder.decode(self.ids[self.prefix_offset:])
        if window.endswith(REPLACEMENT) or len(window) <= len(prefix):
            return ""  # incomplete UTF-8, or nothing visible yet: wait for more tokens
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return window[len(prefix):]

    def add(self, new_ids: list[int]) -> str:
        """Text to emit after these ids ('' if it must wait)."""
        if self.stopped:
            return ""
        self.tokens += len(new_ids)
        self.ids.extend(new_ids)
        self.held += self._decode_new()
        return self._release(final=False)

    def finish(self) -> str:
        """The end of the stream: emit whatever is held back, incomplete bytes included."""
        if self.stopped:
            return ""
        tail = self.decoder.decode(self.ids[self.prefix_offset:])
        prefix = self.decoder.decode(self.ids[self.prefix_offset:self.read_offset])
        self.held += tail[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = find_stop(self.held, self.stop_words)
        if cut >= 0:
            out, self.held, self.stopped = self.held[:cut], "", True
            return out
        keep = 0 if final else partial_stop_len(self.held, self.stop_words)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out
