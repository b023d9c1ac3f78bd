"""Small builders shared by the chat and completions routes: ids, timestamps, usage."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


@dataclass
class Usage:
    """Token counts of one request: each prompt counted once, every choice's completion."""

    prompts: dict[int, int] = field(default_factory=dict)
    completions: dict[int, int] = field(default_factory=dict)

    def add(self, prompt_index: int, choice: int, result: dict[str, Any]) -> None:
        if "prompt_tokens" in result:
            self.prompts[prompt_index] = int(result["prompt_tokens"])
        if "completion_tokens" in result:
            self.completions[choice] = int(result["completion_tokens"])

    def body(self) -> dict[str, int]:
        prompt, completion = sum(self.prompts.values()), sum(self.completions.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
