"""Which Python models of a repository have lost their stub process (SIGKILL, the OOM killer).

Triton 2.51 does not restart a dead Python-backend stub: the model stays READY in its index (and
`/v2/health/ready` stays 200), every request to it fails with "Stub process '<model>_0_0' is not
healthy", and requests that were inside it may never be answered. Unloading and loading the model
again starts a new stub (measured; docs/reliability.md). This module only finds the dead ones, from
/proc: a Python model whose stub runs has a `triton_python_backend_stub <repo>/<model>/1/model.py`
process."""

from __future__ import annotations

import os
from pathlib import Path

STUB = b"triton_python_backend_stub"


def python_models(repository: Path, models: tuple[str, ...]) -> tuple[str, ...]:
    """The models among `models` that run in a Python-backend stub (not ensembles, not tensorrtllm)."""
    found = []
    for model in models:
        try:
            config = (Path(repository) / model / "config.pbtxt").read_text()
        except OSError:
            continue
        if 'backend: "python"' in config:
            found.append(model)
    return tuple(found)


def running_stubs(repository: Path) -> set[str]:
    """The models of `repository` that have at least one live stub process."""
    root = f"{Path(repository).resolve()}/".encode()
    live = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if len(args) < 2 or not args[0].endswith(STUB) or state in (b"Z", b"X"):
            continue
        path = args[1]
        if path.startswith(root) and path.endswith(b"/model.py"):
            live.add(path[len(root):].split(b"/", 1)[0].decode())
    return live


def dead_stubs(repository: Path, models: tuple[str, ...]) -> set[str]:
    """The Python models among `models` (all loaded in Triton) whose stub is gone."""
    wanted = python_models(repository, models)
    return set(wanted) - running_stubs(repository) if wanted else set()
