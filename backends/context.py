"""Fit a prompt and its max_tokens into the model's context size.

Default: a request whose prompt plus max_tokens exceeds the context is refused with the numbers
and the ways out. With `truncate`, the oldest tokens (plain prompts) or the oldest non-system
messages (chat) are dropped, max_tokens is clamped to what is left, and the notice says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backends.errors import RequestError


@dataclass(frozen=True)
class Fitted:
    ids: list[int]
    max_tokens: int
    notice: str = ""


def check_max_tokens(max_tokens: int, context_size: int) -> None:
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}")
    if max_tokens >= context_size:
        raise RequestError(f"max_tokens {max_tokens} does not fit the context size {context_size}: "
                           f"use at most {context_size - 1} (prompt tokens count too)")


def _too_long(prompt_tokens: int, max_tokens: int, context_size: int) -> RequestError:
    room = context_size - prompt_tokens
    fix = f"lower max_tokens to {room}, " if room >= 1 else ""
    return RequestError(
        f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: together they exceed "
        f"the context size of {context_size} tokens; shorten the prompt, {fix}or set truncate=true")


def _notice(before: int, after: int, max_tokens: int, clamped: int, unit: str = "tokens") -> str:
    parts = []
    if after < before:
        parts.append(f"prompt truncated from {before} to {after} {unit}")
    if clamped < max_tokens:
        parts.append(f"max_tokens clamped from {max_tokens} to {clamped}")
    return "; ".join(parts)


def prompt_budget(prompt_tokens: int, max_tokens: int, context_size: int) -> int:
    """How many prompt tokens to keep: room for max_tokens, but never less than half the context
    when max_tokens alone would crowd the prompt out (max_tokens is clamped instead)."""
    return min(prompt_tokens, max(context_size - max_tokens, context_size // 2))


def fit_prompt(ids: list[int], max_tokens: int, context_size: int, truncate: bool) -> Fitted:
    """Fit plain prompt tokens; truncation drops the oldest tokens."""
    if not ids:
        raise RequestError("the prompt is empty: send some text")
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}")
    if truncate:
        keep = prompt_budget(len(ids), max_tokens, context_size)
        kept = ids[len(ids) - keep:]
        clamped = min(max_tokens, context_size - len(kept))
        return Fitted(kept, clamped, _notice(len(ids), len(kept), max_tokens, clamped))
    check_max_tokens(max_tokens, context_size)
    if len(ids) + max_tokens > context_size:
        raise _too_long(len(ids), max_tokens, context_size)
    return Fitted(ids, max_tokens)


def fit_chat(messages: list[dict], encode: Callable[[list[dict]], list[int]], max_tokens: int,
             context_size: int, truncate: bool) -> Fitted:
    """Fit a chat; truncation drops whole messages, oldest non-system first, never the last one."""
    ids = encode(messages)
    if not truncate:
        return fit_prompt(ids, max_tokens, context_size, truncate=False)
    full = len(ids)
    kept = list(messages)
    budget = prompt_budget(full, max_tokens, context_size)
    while len(ids) > budget:
        droppable = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
        if not droppable:
            raise RequestError(
                f"the system messages and the last message alone have {len(ids)} tokens, more than the "
                f"{budget} that fit the context size of {context_size} with max_tokens {max_tokens}: "
                "shorten them or lower max_tokens")
        kept.pop(droppable[0])
        ids = encode(kept)
    clamped = min(max_tokens, context_size - len(ids))
    notice = _notice(full, len(ids), max_tokens, clamped)
    if len(kept) < len(messages):
        notice = f"dropped {len(messages) - len(kept)} oldest messages ({notice})"
    return Fitted(ids, clamped, notice)
