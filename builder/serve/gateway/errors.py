"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the gateway reports is an `ApiError`; the handlers below turn it (and anything
FastAPI or Starlette raises) into that body, so clients (the openai SDK reads `code` and `param`)
never see a traceback, and a client mistake is never a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("serverless_triton.gateway")

INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
    """One HTTP error answer; `headers` carries Retry-After and the like."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


def unavailable(message: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, message, type="server_error", code="service_unavailable",
                    headers={"Retry-After": str(retry_after)})


def param_of(loc: tuple[Any, ...]) -> str | None:
    """pydantic's location -> OpenAI's `param`: ("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        if part in ("body",) and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "union[", "list[", "tagged-union[")):
            out += f".{part}" if out else str(part)
    return out or None


def from_validation(errors: list[dict[str, Any]]) -> ApiError:
    """The first pydantic error as a 400 naming the field (the others usually follow from it)."""
    first = errors[0]
    param = param_of(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: {param}", param=param,
                        code="unsupported_parameter")
    if kind == "missing":
        return ApiError(400, f"missing required parameter: {param}", param=param, code="missing_required_parameter")
    if kind in ("json_invalid", "json_type"):
        return malformed_json(str(first.get("msg", "")))
    return ApiError(400, f"invalid value for {param}: {first.get('msg', 'invalid')}", param=param,
                    code="invalid_value")


def malformed_json(detail: str) -> ApiError:
    return ApiError(400, f"the request body is not valid JSON ({detail}): send a JSON object",
                    code="invalid_json")


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, (RequestValidationError, ValidationError)) else []
    return (from_validation(list(errors)) if errors else bad_request("invalid request")).response()


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    kind = INVALID_REQUEST if exc.status_code < 500 else "server_error"
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return ApiError(exc.status_code, detail, type=kind, code=codes.get(exc.status_code),
                    headers=dict(exc.headers or {})).response()


async def _internal(_: Request, exc: Exception) -> JSONResponse:
    log.error("internal error: %s: %s", type(exc).__name__, exc)
    return ApiError(500, "internal error in the gateway; the server log has the details",
                    type="server_error", code="internal_error").response()


def install_handlers(app: FastAPI) -> None:
    """Route every exception kind to an OpenAI-shaped body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _internal)
