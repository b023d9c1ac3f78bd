"""Request bodies read by hand: malformed JSON and every validation error become a 400 with
`param`, in OpenAI's shape, whatever the Content-Type the client sent."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from builder.serve.gateway.errors import bad_request, from_validation, malformed_json

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
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(list(e.errors())) from None
