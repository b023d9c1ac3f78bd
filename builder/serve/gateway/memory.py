"""How much memory a deployment holds: the resident memory of the Python-backend stubs that serve
its models (read from /proc), and how much the machine has (the default memory budget)."""

from __future__ import annotations

import os
from pathlib import Path


def machine_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def stub_rss_bytes(repository: Path, models: tuple[str, ...]) -> int:
    """Resident memory of the stubs running `models` of this repository (0 where none runs)."""
    wanted = {f"{Path(repository).resolve()}/{m}/1/model.py".encode() for m in models}
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not args or not args[0].endswith(b"triton_python_backend_stub") or not wanted & set(args):
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(ln.split()[1]) * 1024 for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
    return total
