"""backends/stub_watch against real processes shaped like python_backend's stubs: which stubs run a
model under this Triton, and whether one that may serve a call started earlier is still alive."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends import stub_watch


@pytest.fixture
def start_stub(tmp_path, monkeypatch):
    """Start a process whose command line is a stub's: (stub, model.py, shm, sizes, Triton's pid,
    lib dir, IPC handle, instance name, ...); this test process plays Triton."""
    monkeypatch.setattr(stub_watch, "RESCAN_SECONDS", 0.0)
    binary = tmp_path / "triton_python_backend_stub"
    binary.symlink_to(os.path.realpath(sys.executable))
    script = tmp_path / "model.py"
    script.write_text("import time\ntime.sleep(60)\n")
    started: list[subprocess.Popen] = []

    def start(model: str, parent: int | None = None) -> subprocess.Popen:
        argv = [str(binary), str(script), "shm", "1048576", "1048576", str(parent or os.getpid()), "lib", "7",
                f"{model}_0_0", "DEFAULT"]
        p = subprocess.Popen(argv)
        started.append(p)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0] != str(binary).encode():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()


def test_scan_finds_the_stubs_of_a_model_under_this_triton_only(start_stub):
    mine = start_stub("m-engine")
    start_stub("m-engine-call")
    start_stub("m-engine", parent=1)            # another Triton's
    assert set(stub_watch.scan("m-engine", os.getpid())) == {mine.pid}
    assert stub_watch.scan("m", os.getpid()) == {}


def test_a_guard_turns_false_when_its_stub_dies_even_as_a_zombie(start_stub):
    stub = start_stub("m-engine")
    watch = stub_watch.StubWatch("m-engine", os.getpid())
    alive = watch.guard()
    assert alive is not None and alive()
    stub.kill()
    deadline = time.monotonic() + 5
    while alive():                              # not reaped yet: a zombie is dead too
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stub.wait()
    assert not alive()


def test_a_stub_started_after_the_call_does_not_serve_it_but_serves_the_next(start_stub):
    old = start_stub("m-engine")
    watch = stub_watch.StubWatch("m-engine", os.getpid())
    alive = watch.guard()
    time.sleep(0.02)                            # start times are in ticks of 10 ms
    old.kill()
    old.wait()
    start_stub("m-engine")                      # the reload after the death
    assert not alive()
    assert watch.guard() is not None and watch.guard()()


def test_a_stub_started_before_the_call_still_serves_it_when_the_old_one_leaves(start_stub):
    old, new = start_stub("m-engine"), start_stub("m-engine")     # a reload swapping instances
    time.sleep(0.02)
    alive = stub_watch.StubWatch("m-engine", os.getpid()).guard()
    old.kill()
    old.wait()
    assert alive()
    new.kill()
    new.wait()
    assert not alive()


def test_no_stub_seen_means_no_watch():
    assert stub_watch.StubWatch("nothing-runs-this", os.getpid()).guard() is None
