"""Token counts for embedding usage, with the deployment's own tokenizer.

The embedding ensemble returns vectors only, so usage.prompt_tokens is counted here with the
same tokenizer.json and the same truncation (embedding.json's max_length) the tokenize model
applies. Tokenizers are loaded on first use and kept per deployment.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from tokenizers import Tokenizer, normalizers

log = logging.getLogger("serverless_triton.gateway")


def load_counter(directory: Path) -> Tokenizer | None:
    """The tokenizer as the tokenize model uses it (no padding, its truncation), or None if absent."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    settings_path = directory / "embedding.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    if settings.get("do_lower_case"):
        current = tok.normalizer
        tok.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([current] if current else []))
    if settings.get("max_length"):
        tok.enable_truncation(max_length=int(settings["max_length"]))
    return tok


class TokenCounters:
    """`count(name, texts)`: tokens the model sees for these texts (0 if no tokenizer is found)."""

    def __init__(self, repository: Path):
        self.repository = Path(repository)
        self._tokenizers: dict[str, Tokenizer | None] = {}
        self._lock = threading.Lock()

    def _get(self, name: str) -> Tokenizer | None:
        with self._lock:
            if name not in self._tokenizers:
                directory = self.repository / f"{name}-tokenize" / "1" / "tokenizer"
                try:
                    self._tokenizers[name] = load_counter(directory)
                except Exception as e:  # noqa: BLE001 -- tokenizers raises its own types; usage must not fail a request
                    log.warning("cannot count tokens for %s (%s): usage will say 0", name, e)
                    self._tokenizers[name] = None
            return self._tokenizers[name]

    def count(self, name: str, texts: list[str]) -> int:
        tok = self._get(name)
        if tok is None:
            return 0
        return sum(len(e.ids) for e in tok.encode_batch(texts))
