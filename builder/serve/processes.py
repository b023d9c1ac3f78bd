"""Child processes: stopping one that leads its own process group, so nothing it started outlives
it, and finding the children of a process (Linux /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def stop_process_group(proc: subprocess.Popen, steps: tuple[tuple[int, float], ...], *,
                       leader_only: bool = False) -> None:
    """Send each (signal, seconds to wait) to the group until the leader exits, then SIGKILL the
    group anyway (children that outlived their leader) and reap the leader.

    `leader_only` signals the leader alone, for a leader that shuts its children down itself and
    cleans up after them (tritonserver finalizes its Python stubs and frees their shared memory;
    signalling the stubs too kills them mid-protocol and leaks it)."""
    for sig, wait in steps:
        if proc.poll() is not None:
            break
        try:
            if leader_only:
                proc.send_signal(sig)
            else:
                os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def children(pid: int) -> dict[int, list[str]]:
    """The live children of `pid`: {child pid: its /proc/<pid>/stat fields after the command name}
    (field 1 is the parent pid, 11 and 12 the user and system CPU ticks)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found[int(stat.parent.name)] = fields
    return found


def die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies, even by SIGKILL (Linux), so a
    killed `serve` cannot leave Triton, its stubs or the gateway running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
