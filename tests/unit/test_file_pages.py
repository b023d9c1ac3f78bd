"""backends/file_pages.py on a real memory-mapped file: the resident pages of a shared mapping leave
the process and stay in the page cache (read again without touching the disk), what is read again
is intact, and a private mapping, which can hold the process's own writes, is left alone."""

from __future__ import annotations

import mmap
import os
import resource

from backends import file_pages


def _touch(m: mmap.mmap) -> int:
    return sum(m[i + 1] for i in range(0, len(m), 4096))


def test_a_shared_mapping_is_released_and_read_again_from_the_page_cache(tmp_path):
    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * (4 << 12)          # 4 MiB
    with open(path, "wb") as f:                   # clean pages, as a built engine's are
        f.write(data)
        os.fsync(f.fileno())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:   # r--s, as OpenVINO maps
        assert _touch(m) > 0
        assert file_pages.resident_bytes(path) >= len(data) - 4096
        assert file_pages.release(path) == 1
        assert file_pages.resident_bytes(path) < len(data) // 4
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_majflt    # this thread's faults only
        assert m[:] == data                                           # faulted back in, unchanged
        # from the page cache: MADV_PAGEOUT, used before, dropped it and the next request read the disk
        assert resource.getrusage(resource.RUSAGE_THREAD).ru_majflt == before


def test_a_private_mapping_which_can_hold_its_own_writes_is_left_alone(tmp_path):
    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * (1 << 12)          # 1 MiB
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:   # rw-p: copy on write
        m[:4] = b"mine"
        assert file_pages.release(path) == 0
        assert m[:4] == b"mine" and m[4:] == data[4:]


def test_nothing_mapped_is_nothing_to_do(tmp_path):
    path = tmp_path / "absent.bin"
    assert file_pages.mapped_ranges(path) == [] and file_pages.release(path) == 0
