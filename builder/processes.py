"""Stopping a child that leads its own process group, so nothing it started outlives it."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(proc: subprocess.Popen, steps: tuple[tuple[int, float], ...]) -> None:
    """Send each (signal, seconds to wait) to the group until the leader exits, then SIGKILL the
    group anyway (children that outlived their leader) and reap the leader."""
    for sig, wait in steps:
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
