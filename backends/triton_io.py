"""Tensor <-> plain-value helpers for the model.py files (imported inside Triton only).

Errors a client caused become a Triton error response (HTTP 400) with our message; anything else
is logged with its traceback in Triton's log and answered with a short message, so a bad request
never crashes a model or leaks internals.
"""

from __future__ import annotations

import collections
import json
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.contract.faults import died_mid_request
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


def requested_outputs(request) -> frozenset[str] | None:
    """The outputs the request asked for (Triton fills in every output when a client names none);
    None where the request cannot say (then every output is sent)."""
    names = getattr(request, "requested_output_names", None)
    try:
        return frozenset(names()) or None if names else None    # none named (HTTP generate): all
    except Exception:
        return None


def tensors(values: dict[str, np.ndarray], batch: bool = True, only: frozenset[str] | None = None) -> list:
    """Output tensors; `batch` adds the leading batch dimension of 1 (max_batch_size > 0). `only`
    (requested_outputs) leaves out what the request did not ask for: Triton 2.51's response sender
    drops those itself, with the GIL released, destroying their NumPy arrays without it (see
    exec_decoupled), so they are never made."""
    return [pb_utils.Tensor(k, v[np.newaxis, ...] if batch else v) for k, v in values.items()
            if only is None or k in only]


def error_response(message: str, internal: bool = False, unavailable: bool = False):
    """A client mistake answers HTTP 400 / gRPC INVALID_ARGUMENT; `internal` answers 500 / INTERNAL;
    `unavailable` (a model this one calls died: retry) 503 / UNAVAILABLE."""
    code = (pb_utils.TritonError.UNAVAILABLE if unavailable else
            pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def guarded(role: str, fn: Callable, *args):
    """Run fn; turn a RequestError into a client error and anything else into a short one."""
    try:
        return fn(*args)
    except RequestError as e:
        return error_response(str(e))
    except CalleeGone as e:
        pb_utils.Logger.log_warn(f"{role}: {e}")
        return error_response(str(e), unavailable=True)
    except Exception as e:  # logged in full, answered briefly
        pb_utils.Logger.log_error(f"{role}: {traceback.format_exc()}")
        return error_response(f"internal error in {role}: {type(e).__name__}: {e}", internal=True)


def is_cancelled(request) -> bool:
    check = getattr(request, "is_cancelled", None)
    try:
        return bool(check()) if check else False
    except Exception:
        return True


# -- decoupled BLS calls ---------------------------------------------------------------------------
# Triton 2.51's Python backend (python_backend r24.10) keeps each decoupled BLS call's response
# iterator, holding every response it returned, in a map of the stub's that its C++ utils thread
# erases after the last response (Stub::SendCleanupId). Whichever of that erase and Python's last
# reference comes second destroys the responses; on the C++ thread that frees their tensors' NumPy
# arrays without the GIL (r24.12 fixed it: ~PbTensor takes the GIL, python_backend #390), which
# corrupts the stub's heap while other threads run Python: a segfault in libpython, or "malloc():
# unaligned fastbin chunk detected". Several streams that hang up at once make the utils thread
# late (cancellation checks, logs, cleanups queue on it) and Python's reference the first to go.
# So every iterator is kept HELD_SECONDS after its last response, well past the erase, and then
# dropped by Python, with the GIL.
HELD_SECONDS = 10.0
_held: collections.deque = collections.deque()     # (time.monotonic(), finished response iterator)
_held_lock = threading.Lock()
_reaper: threading.Thread | None = None      # drops, every HELD_SECONDS / 2, what a quiet model holds


def _expire(now: float) -> None:
    expired = []
    with _held_lock:
        while _held and now - _held[0][0] > HELD_SECONDS:
            expired.append(_held.popleft())
    expired.clear()     # destroyed here, outside the lock, with the GIL


def _reap() -> None:
    while True:
        time.sleep(HELD_SECONDS / 2)
        _expire(time.monotonic())


def _hold(responses) -> None:
    global _reaper
    now = time.monotonic()
    with _held_lock:
        _held.append((now, responses))
        if _reaper is None:
            _reaper = threading.Thread(target=_reap, name="bls-iterator-reaper", daemon=True)
            _reaper.start()
    _expire(now)


def release_held() -> None:
    """Drop every held iterator: for finalize (the stub has emptied its map by then)."""
    with _held_lock:
        items = list(_held)
        _held.clear()
    items.clear()


# A watched call's request asks its callee for an empty first response at once (the CPU engine
# sends one; only watched calls, into Python stubs, ask): python_backend's exec() waits for the first
# response on a thread of Triton's that an unload then waits for, so a call still in exec() when
# its callee dies would keep the caller from ever unloading. After the first response, the wait
# is the caller's own, in Python, where the watch below can end it.
ACK = "serverless_triton_ack"


def call_parameters(alive: Callable[[], bool] | None) -> dict:
    """The BLS request parameters of a call watched by `alive` (StubWatch.guard()), or of one that
    is not watched (None: nothing asked of the callee)."""
    return {ACK: True} if alive is not None else {}


def wants_ack(request) -> bool:
    """Whether the request asks for an empty first response (ACK)."""
    try:
        return bool(json.loads(request.parameters() or "{}").get(ACK))
    except (AttributeError, ValueError, TypeError):
        return False


def send_ack(request) -> None:
    if wants_ack(request):
        request.get_response_sender().send(pb_utils.InferenceResponse(output_tensors=[]))


class CalleeGone(Exception):
    """The stub serving a decoupled BLS call died before its last response (see stub_watch)."""


POLL_SECONDS = 0.5      # how often a call waiting for a response checks that its callee lives
_END = object()


def _pump(request, out: queue.SimpleQueue) -> None:
    """Reader thread of a watched call: makes the call (exec itself waits for the first response)
    and puts every response into `out`, then _END (with the error, if the call raised); the
    finished iterator is held as below. It blocks for good inside a call whose callee died: a
    thread and nothing else, as its caller has stopped waiting for it."""
    try:
        responses = request.exec(decoupled=True)
    except BaseException as e:  # noqa: BLE001 -- handed to the caller
        out.put((_END, e))
        return
    try:
        for response in responses:
            out.put((response, None))
        out.put((_END, None))
    except BaseException as e:  # noqa: BLE001 -- handed to the caller
        out.put((_END, e))
    _hold(responses)


def _watched(request, alive: Callable[[], bool], callee: str) -> Iterator:
    out: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_pump, args=(request, out), name="bls-responses", daemon=True).start()
    done = False

    def take():
        while True:
            try:
                return out.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not alive():
                    raise CalleeGone(died_mid_request(callee)) from None

    try:
        while True:
            try:
                response, error = take()
            except CalleeGone:
                done = True     # nothing more will come: answer the caller now
                raise
            if response is _END:
                done = True
                if error is not None:
                    raise error
                return
            yield response
    finally:
        try:
            while not done:     # a caller that stops early still waits for the rest, as below
                done = take()[0] is _END
        except CalleeGone:
            pass


def exec_decoupled(request, alive: Callable[[], bool] | None = None, callee: str = "the model called") -> Iterator:
    """The responses of request.exec(decoupled=True). A caller that stops early (an error, a
    break) waits for the rest here, as the iterator itself would when destroyed; the iterator is
    then held (see above) instead of being left to the stub's C++ thread. With `alive` (the
    callee's StubWatch.guard(), taken as the request was made with call_parameters(alive)), a
    callee that dies mid-call raises CalleeGone instead of waiting for good."""
    if alive is not None:
        yield from _watched(request, alive, callee)
        return
    responses = request.exec(decoupled=True)   # returns with the first response
    done = False
    try:
        yield from responses
        done = True
    finally:
        try:
            while not done:     # next(), not `for`: iter() on a finished iterator starts it over
                try:
                    next(responses)
                except StopIteration:
                    done = True
        finally:
            _hold(responses)
