"""Tensor <-> plain-value helpers for the model.py files (imported inside Triton only).

Errors a client caused become a Triton error response (HTTP 400) with our message; anything else
is logged with its traceback in Triton's log and answered with a short message, so a bad request
never crashes a model or leaks internals.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.errors import RequestError


def parameters(args: dict) -> dict[str, str]:
    """The model config's `parameters` as {key: string_value}."""
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


def _array(request, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def scalar(request, name: str, cast: Callable = int):
    """One value (shape [1] or [1, 1]); None when the optional input was not sent."""
    arr = _array(request, name)
    if arr is None:
        return None
    if arr.size != 1:
        raise RequestError(f"{name} must hold exactly one value per request, got shape {list(arr.shape)}; "
                           "send one prompt per request (concurrent requests are batched in flight)")
    return cast(arr.reshape(-1)[0])


def one_string(request, name: str) -> bytes | None:
    """One BYTES value; None when the optional input was not sent."""
    arr = _array(request, name)
    if arr is None:
        return None
    if arr.size != 1:
        raise RequestError(f"{name} must hold exactly one value per request, got shape {list(arr.shape)}")
    v = arr.reshape(-1)[0]
    return v if isinstance(v, bytes) else str(v).encode()


def strings(request, name: str) -> list[bytes]:
    arr = _array(request, name)
    if arr is None:
        return []
    return [v if isinstance(v, bytes) else str(v).encode() for v in arr.reshape(-1)]


def array(request, name: str) -> np.ndarray | None:
    return _array(request, name)


def tensors(values: dict[str, np.ndarray], batch: bool = True) -> list:
    """Output tensors; `batch` adds the leading batch dimension of 1 (max_batch_size > 0)."""
    return [pb_utils.Tensor(k, v[np.newaxis, ...] if batch else v) for k, v in values.items()]


def error_response(message: str, internal: bool = False):
    """A client mistake answers HTTP 400 / gRPC INVALID_ARGUMENT; `internal` answers 500 / INTERNAL."""
    code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def guarded(role: str, fn: Callable, *args):
    """Run fn; turn a RequestError into a client error and anything else into a short one."""
    try:
        return fn(*args)
    except RequestError as e:
        return error_response(str(e))
    except Exception as e:  # logged in full, answered briefly
        pb_utils.Logger.log_error(f"{role}: {traceback.format_exc()}")
        return error_response(f"internal error in {role}: {type(e).__name__}: {e}", internal=True)


def is_cancelled(request) -> bool:
    check = getattr(request, "is_cancelled", None)
    try:
        return bool(check()) if check else False
    except Exception:
        return True
