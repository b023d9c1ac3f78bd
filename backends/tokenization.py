"""Tokenizer and chat template of one model, loaded from its Hugging Face files.

Encoding uses `tokenizers` (the same Rust code transformers' fast tokenizers run); chat templates
are rendered the way transformers' `apply_chat_template` renders them (sandboxed jinja2,
trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`), so prompts match token for token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from backends.errors import RequestError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "config.json")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass
class ModelTokenizer:
    tokenizer: Tokenizer
    config: dict = field(default_factory=dict)          # tokenizer_config.json
    generation: dict = field(default_factory=dict)      # generation_config.json
    chat_template: str | None = None

    @classmethod
    def load(cls, directory: Path) -> "ModelTokenizer":
        d = Path(directory)
        cfg = _read_json(d / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if (d / "chat_template.jinja").exists():  # transformers >= 4.43 saves it beside
            template = (d / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        generation = _read_json(d / "generation_config.json")
        model_cfg = _read_json(d / "config.json")
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            generation.setdefault(key, model_cfg.get(key))
        return cls(Tokenizer.from_file(str(d / "tokenizer.json")), cfg, generation, template)

    # -- special tokens ---------------------------------------------------------------------
    def special(self, name: str) -> str | None:
        return _token_text(self.config.get(name))

    def _id_of(self, key: str, token_name: str) -> int | None:
        value = self.generation.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None and self.special(token_name) is not None:
            value = self.tokenizer.token_to_id(self.special(token_name))
        return value

    @cached_property
    def vocab_size(self) -> int:
        """Token ids of this model are below this (added tokens included). Cached: tokenizers builds
        the whole vocabulary on every call (5-25 ms for a 49k vocabulary)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @cached_property
    def eos_token_id(self) -> int:
        eos = self._id_of("eos_token_id", "eos_token")
        if eos is None:
            raise RequestError("the model declares no end-of-sequence token: pass end_id explicitly")
        return int(eos)

    @cached_property
    def pad_token_id(self) -> int:
        pad = self._id_of("pad_token_id", "pad_token")
        return int(pad) if pad is not None else self.eos_token_id

    @cached_property
    def stop_token_ids(self) -> list[int]:
        """Every id generation_config.json lists as an end of sequence."""
        value = self.generation.get("eos_token_id")
        ids = value if isinstance(value, list) else [value] if value is not None else []
        return [int(i) for i in ids] or [self.eos_token_id]

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; BOS/EOS are added as the tokenizer's own post-processor says."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- chat -------------------------------------------------------------------------------
    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise RequestError("this model has no chat template: send text_input instead of messages")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message: str):
            raise RequestError(f"chat template refused the messages: {message}")

        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        specials = {k: _token_text(v) for k, v in self.config.items()
                    if k.endswith("_token") and _token_text(v) is not None}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **specials)
        except RequestError:
            raise
        except jinja2.TemplateError as e:
            raise RequestError(f"the chat template failed on these messages ({e}): check roles and contents") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The chat template already writes BOS where the model wants it."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def parse_messages(raw: str) -> list[dict]:
    """Validate the `messages` input: a JSON list of {"role": str, "content": str}."""
    try:
        messages = json.loads(raw)
    except ValueError as e:
        raise RequestError(f"messages is not valid JSON ({e.msg} at position {e.pos}): "
                           'send a JSON list like [{"role": "user", "content": "Hi"}]') from None
    if not isinstance(messages, list) or not messages:
        raise RequestError('messages must be a non-empty JSON list like [{"role": "user", "content": "Hi"}]')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}] must be an object with string fields role and content")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise RequestError(f"messages[{i}] has unknown role {m['role']!r}: use system, user, assistant or tool")
    return messages
