"""Is the Python stub that runs a model of this Triton still the one a call went to?

A decoupled BLS call (python_backend r24.10) waits for its responses without a timeout, and this
Python backend cannot cancel it. When the called model's stub dies mid-call (out of memory,
SIGKILL), nobody sends those responses: the calling thread waits for good, its own request never
ends, and Triton can never unload the calling model (seen: the stream model stuck in UNLOADING
after its engine stub was killed, docs/reliability.md). So a caller notes, when it calls, which
stub processes run the callee, and gives up once none of those is left.

Stubs are found in /proc by their command line (python_backend's stub argv: model.py, shm region,
two shm sizes, Triton's pid, library dir, IPC handle, instance name `<model>_<group>_<index>`),
among the children of this stub's own Triton. A stub started after the call cannot be serving it
(a reload after the death), so it does not count; one started before it can (a reload that
swapped instances just before the call). Where no stub of the callee is found at the call
(/proc hidden, a renamed stub, a callee that is no Python stub such as TensorRT-LLM), nothing is
watched: the call waits as it always did. A call counts as alive while any such stub lives: exact
for the CPU engine, which runs one instance; with several, a call inside the one that died would
wait until the others die too.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

STUB = b"triton_python_backend_stub"
RESCAN_SECONDS = 0.5        # a full /proc scan at most this often per model (a few ms each)
_TICKS = os.sysconf("SC_CLK_TCK")


def _started(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # after the command name: state is field 3 of stat(5), starttime field 22
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def now_ticks() -> int:
    """This moment in the same clock as /proc/<pid>/stat's start times."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _TICKS)


def scan(model: str, triton_pid: int) -> dict[int, int]:
    """pid -> start time of every live stub running an instance of `model` under `triton_pid`."""
    found: dict[int, int] = {}
    parent = str(triton_pid).encode()
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (len(argv) > 8 and argv[0].endswith(STUB) and argv[5] == parent
                and argv[8].decode(errors="replace").rsplit("_", 2)[0] == model):
            start = _started(int(entry.name))
            if start is not None:
                found[int(entry.name)] = start
    return found


class StubWatch:
    """The stubs of one callee model, shared by every call to it from this stub."""

    def __init__(self, model: str, triton_pid: int | None = None):
        self.model = model
        self.triton_pid = triton_pid or os.getppid()
        self._lock = threading.Lock()
        self._stubs: dict[int, int] = {}
        self._scanned = float("-inf")

    def stubs(self, now: bool = False) -> dict[int, int]:
        """The live stubs: the known ones re-checked (cheap), the whole of /proc rescanned when one
        of them is gone or none is known (at most every RESCAN_SECONDS, unless `now`)."""
        with self._lock:
            alive = {p: s for p, s in self._stubs.items() if _started(p) == s}
            if (not alive or len(alive) < len(self._stubs)) and (
                    now or time.monotonic() - self._scanned >= RESCAN_SECONDS):
                self._stubs, self._scanned = scan(self.model, self.triton_pid), time.monotonic()
                return dict(self._stubs)     # scan() kept only live stubs
            return alive

    def guard(self) -> Callable[[], bool] | None:
        """For a call starting now: a check that is true while a stub that may be serving it lives
        (one started no later than now); None when no stub of the model can be seen."""
        call_start = now_ticks() + 1        # start times are whole ticks: one tick of slack
        # a fresh scan when none is known alive: a call just after a death must see the new stub
        if not any(s <= call_start for s in self.stubs(now=True).values()):
            return None
        return lambda: any(s <= call_start for s in self.stubs().values())
