"""Give back the resident pages of a memory-mapped file that a process no longer reads.

Why: OpenVINO memory-maps an engine's `openvino_model.bin`, and on the first inference the CPU
plugin repacks every weight for its kernels into memory of its own. The mapped originals stay
resident (file-backed, clean) beside the copies: 128 MB of the int8 SmolLM2 engine's RSS, which
the memory budget counts. `MADV_DONTNEED` on a shared mapping (OpenVINO maps the file read-only
and shared) takes the pages out of this process (its RSS falls by as much) and leaves them in the
page cache: a page read again (an embedding row looked up in the original table) is a minor fault
from there. The page cache still counts in a container's memory cgroup, but the kernel reclaims it
before it fails an allocation. Only shared mappings are released: the data of a shared mapping
lives in the page cache, so nothing of the process's own can be lost (a private one could hold
its own copy-on-write pages). Measured on the int8 engine (docs/cpu-performance.md): 671 -> 540 MB
after 8 x 1000-token prompts.

`MADV_PAGEOUT` was used first: it also drops pages from the page cache (~2.5 MB of this file, the
ones the first answer had just read), so the next request read them back from disk in major
faults: its first token took 221-253 ms against 53-84 ms now (in-process, AVX2 host,
docs/cpu-performance.md).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from pathlib import Path

log = logging.getLogger(__name__)

def _mapping(line: str) -> tuple[int, int, str, str] | None:
    """(start, end, permissions, path) of a mapping's header line in /proc/self/maps or smaps (path
    "" for an anonymous mapping); None for smaps' per-mapping field lines ("Rss:    4 kB")."""
    parts = line.split(maxsplit=5)
    if len(parts) < 5 or parts[0].endswith(":"):
        return None
    start, end = (int(x, 16) for x in parts[0].split("-"))
    return start, end, parts[1], parts[5].rstrip("\n") if len(parts) == 6 else ""


def mapped_ranges(path: Path, shared_only: bool = False) -> list[tuple[int, int]]:
    """Address ranges [start, end) of this process's mappings of `path` (with `shared_only`, only
    the shared ones: permissions like `r--s`)."""
    target = str(Path(path).resolve())
    with open("/proc/self/maps") as maps:
        return [(m[0], m[1]) for m in map(_mapping, maps)
                if m and m[3] == target and not (shared_only and m[2][3:4] != "s")]


def resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (from /proc/self/smaps)."""
    target, total, inside = str(Path(path).resolve()), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if (m := _mapping(line)) is not None:
                inside = m[3] == target
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def release(path: Path) -> int:
    """Take the resident pages of every shared mapping of `path` out of this process (they stay in
    the page cache); returns how many mappings were released (0 where the kernel or the platform
    cannot: never an error)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        ranges = mapped_ranges(path, shared_only=True)
        advice = mmap.MADV_DONTNEED
    except (OSError, AttributeError) as e:
        log.info("cannot release the pages of %s: %s", path, e)
        return 0
    done = 0
    for start, end in ranges:
        if madvise(start, end - start, advice) == 0:
            done += 1
        else:
            log.info("madvise(MADV_DONTNEED) on %s failed: errno %d", path, ctypes.get_errno())
    return done
