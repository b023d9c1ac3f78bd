"""Stopping a child that leads its own process group, so nothing it started outlives it."""

from __future__ import annotations

import os
import signal
import subprocess


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
