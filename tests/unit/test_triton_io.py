"""backends/triton_io's guards against Triton 2.51's frees without the GIL (docs/reliability.md):
a decoupled BLS iterator is drained however its caller stops, and kept past the stub's own
cleanup before Python drops it; responses carry only the outputs the request asked for. The
Python backend's module exists only inside a stub, so a minimal stand-in provides Tensor."""

from __future__ import annotations

import importlib
import sys
import threading
import time
import types

import numpy as np
import pytest


class _Tensor:
    def __init__(self, name, array):
        self._name, self.array = name, array

    def name(self):
        return self._name


@pytest.fixture
def io(monkeypatch):
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = _Tensor
    fake.TritonError = type("TritonError", (), {"INTERNAL": 1, "INVALID_ARG": 2, "UNAVAILABLE": 3})
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    sys.modules.pop("backends.triton_io", None)
    module = importlib.import_module("backends.triton_io")
    yield module
    module.release_held()
    sys.modules.pop("backends.triton_io", None)


class _Iterator:
    """Like python_backend's ResponseIterator: iter() on a finished one starts it over."""

    def __init__(self, n):
        self.items, self.i, self.finished = list(range(n)), 0, False

    def __iter__(self):
        if self.finished:
            self.i = 0
        return self

    def __next__(self):
        if self.i >= len(self.items):
            self.finished = True
            raise StopIteration
        self.i += 1
        return self.items[self.i - 1]


class _Request:
    def __init__(self, n, outputs=("a",)):
        self.iterator, self.outputs = _Iterator(n), outputs

    def exec(self, decoupled):
        assert decoupled
        return self.iterator

    def requested_output_names(self):
        return set(self.outputs)


def test_every_response_is_yielded_and_the_iterator_is_held_after_the_last(io):
    r = _Request(5)
    assert list(io.exec_decoupled(r)) == [0, 1, 2, 3, 4]
    assert io._held[-1][1] is r.iterator


def test_a_caller_that_stops_early_still_drains_the_iterator(io):
    r = _Request(5)
    for x in io.exec_decoupled(r):
        if x == 1:
            break
    assert r.iterator.finished and r.iterator.i == 5
    failing = _Request(5)
    with pytest.raises(ValueError):
        for _ in io.exec_decoupled(failing):
            raise ValueError("the caller failed")
    assert failing.iterator.finished and len(io._held) == 2


def test_held_iterators_expire_after_held_seconds_and_release_drops_the_rest(io, monkeypatch):
    for _ in range(3):
        list(io.exec_decoupled(_Request(2)))
    monkeypatch.setattr(io, "HELD_SECONDS", 0.01)
    time.sleep(0.05)
    list(io.exec_decoupled(_Request(1)))          # holding one expires the old ones
    assert len(io._held) == 1
    io.release_held()
    assert not io._held


def test_only_requested_outputs_are_made_and_none_named_means_all(io):
    values = {"a": np.zeros(1), "b": np.zeros(1)}
    assert [t.name() for t in io.tensors(values, only=io.requested_outputs(_Request(0)))] == ["a"]
    assert [t.name() for t in io.tensors(values, only=io.requested_outputs(_Request(0, outputs=())))] == ["a", "b"]
    assert [t.name() for t in io.tensors(values, only=io.requested_outputs(object()))] == ["a", "b"]


# -- a call whose callee dies (backends/stub_watch) -----------------------------------------------
class _Hanging:
    """A decoupled call that sends `n` responses, then waits like a call inside a dead stub (until
    `release`, which the tests set so that a regression fails instead of hanging)."""

    def __init__(self, n, in_exec=False):
        self.n, self.in_exec, self.release = n, in_exec, threading.Event()
        self.finished = False

    def exec(self, decoupled):
        if self.in_exec:            # python_backend's exec() returns with the first response
            self.release.wait()
        return self._responses()

    def _responses(self):
        yield from range(self.n)
        self.release.wait()
        self.finished = True


@pytest.mark.parametrize("in_exec", [False, True], ids=["between responses", "before the first"])
def test_a_watched_call_ends_with_callee_gone_once_its_callee_dies(io, monkeypatch, in_exec):
    monkeypatch.setattr(io, "POLL_SECONDS", 0.02)
    alive, call = threading.Event(), _Hanging(3, in_exec)
    alive.set()
    got = []
    threading.Timer(0.2, alive.clear).start()
    threading.Timer(5, call.release.set).start()        # a regression fails below instead of hanging
    started = time.monotonic()
    with pytest.raises(io.CalleeGone, match="engine died while it ran this request"):
        for x in io.exec_decoupled(call, alive.is_set, "engine"):
            got.append(x)
    assert time.monotonic() - started < 1, "the caller waited past its callee's death"
    assert got == ([] if in_exec else [0, 1, 2])
    call.release.set()


def test_a_watched_call_yields_every_response_and_holds_the_finished_iterator(io):
    call = _Request(4)
    assert list(io.exec_decoupled(call, lambda: True, "engine")) == [0, 1, 2, 3]
    deadline = time.monotonic() + 2
    while not io._held:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert io._held[-1][1] is call.iterator


def test_a_watched_caller_that_stops_early_waits_for_the_rest(io):
    call = _Hanging(3)
    threading.Timer(0.3, call.release.set).start()
    started = time.monotonic()
    for x in io.exec_decoupled(call, lambda: True, "engine"):
        if x == 1:
            break
    assert call.finished and time.monotonic() - started >= 0.25


def test_a_call_that_is_not_watched_asks_nothing_of_its_callee_and_waits_as_before(io):
    assert io.call_parameters(None) == {} and io.call_parameters(lambda: True) == {io.ACK: True}
    assert list(io.exec_decoupled(_Request(3), None)) == [0, 1, 2]


def test_an_error_of_a_watched_call_reaches_its_caller(io):
    class Failing:
        def exec(self, decoupled):
            raise RuntimeError("exec failed")
    with pytest.raises(RuntimeError, match="exec failed"):
        list(io.exec_decoupled(Failing(), lambda: True, "engine"))
