"""Give back the resident pages of a memory-mapped file that a process no longer reads.

Why: OpenVINO memory-maps an engine's `openvino_model.bin`, and on the first inference the CPU
plugin repacks every weight for its kernels into memory of its own. The mapped originals stay
resident (file-backed, clean) beside the copies: 128 MB of the int8 SmolLM2 engine's RSS, which
the memory budget and a container's memory limit count. `MADV_PAGEOUT` (Linux 5.4+) asks the
kernel to reclaim them; clean file pages are simply dropped, so nothing is lost, and any page read
again (an embedding row looked up in the original table) is faulted back in from the file.
Measured on the int8 engine (docs/cpu-performance.md): 671 -> 540 MB after 8 x 1000-token prompts.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21


def _mapping(line: str) -> tuple[int, int, str] | None:
    """(start, end, path) of a mapping's header line in /proc/self/maps or smaps (path "" for an
    anonymous mapping); None for smaps' per-mapping field lines ("Rss:    4 kB")."""
    parts = line.split(maxsplit=5)
    if len(parts) < 5 or parts[0].endswith(":"):
        return None
    start, end = (int(x, 16) for x in parts[0].split("-"))
    return start, end, parts[5].rstrip("\n") if len(parts) == 6 else ""


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges [start, end) of this process's mappings of `path`."""
    target = str(Path(path).resolve())
    with open("/proc/self/maps") as maps:
        return [(m[0], m[1]) for m in map(_mapping, maps) if m and m[2] == target]


def resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (from /proc/self/smaps)."""
    target, total, inside = str(Path(path).resolve()), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if (m := _mapping(line)) is not None:
                inside = m[2] == target
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def page_out(path: Path) -> int:
    """Ask the kernel to reclaim the resident pages of every mapping of `path`; returns how many
    mappings were advised (0 where the kernel or the platform cannot: never an error)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        ranges = mapped_ranges(path)
    except (OSError, AttributeError) as e:
        log.info("cannot page out %s: %s", path, e)
        return 0
    done = 0
    for start, end in ranges:
        if madvise(start, end - start, MADV_PAGEOUT) == 0:
            done += 1
        else:
            log.info("madvise(MADV_PAGEOUT) on %s failed: errno %d", path, ctypes.get_errno())
    return done
