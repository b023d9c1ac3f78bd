"""Request bodies read by hand: malformed JSON and every validation error become a 400 with
`param`, in OpenAI's shape, whatever the Content-Type the client sent."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from builder.serve.gateway.errors import bad_request, from_validation, malformed_json
from builder.serve.gateway.metrics import note_deployment

M = TypeVar("M", bound=BaseModel)


async def parse(request: Request, model: type[M]) -> M:
    raw = await request.body()
    if not raw.strip():
        raise bad_request("the request body is empty: send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise malformed_json("it is not UTF-8") from None
    except ValueError as e:
        raise malformed_json(f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError)
                             else str(e)) from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    note_deployment(request, data.get("model"))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(list(e.errors())) from None


def text_list(value: Any, param: str, limit: int) -> list[str]:
    """A string or a list of strings (a prompt, embedding inputs) as a list; token ids, an empty
    list or more than `limit` strings are a 400 naming `param`."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise bad_request(f"{param} must not be empty: send a string or a list of strings", param)
    if not all(isinstance(t, str) for t in texts):
        raise bad_request(f"token ids are not supported in {param}: send text (a string or a list of strings)",
                          param)
    if len(texts) > limit:
        raise bad_request(f"{param} holds {len(texts)} strings; at most {limit} are allowed per request", param)
    return texts
