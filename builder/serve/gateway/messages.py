"""Chat messages as the engine takes them: `[{"role", "content": str}]`.

OpenAI clients send content as a string or as a list of parts; only text parts mean something to
a text model, so they are joined and anything else is refused with the index of the offending part.
`developer` is OpenAI's newer name for `system`. Tool calls are refused until the engine has them.
"""

from __future__ import annotations

from typing import Any

from builder.serve.gateway.errors import bad_request, unsupported

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"{where}[{j}] is a {kind!r} part: only text parts "
                                  '({"type": "text", "text": ...}) are supported by text models', f"{where}[{j}].type")
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{where}[{j}].text must be a string", f"{where}[{j}].text")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"{where} must be a string or a list of text parts", where)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Validated messages with string contents; 400 naming the message and field otherwise."""
    if not messages:
        raise bad_request("messages must not be empty: send at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise unsupported(f"{where}.role" if role in ("tool", "function") else f"{where}.tool_calls",
                              "tool and function calls are not available on these deployments")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of system, developer, user, assistant; got {role!r}",
                              f"{where}.role")
        if "content" not in m or m["content"] is None:
            raise bad_request(f"{where}.content is missing: send the message text", f"{where}.content")
        out.append({"role": ROLES[role], "content": _text(m["content"], f"{where}.content")})
    return out
