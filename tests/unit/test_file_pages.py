"""backends/file_pages.py on a real memory-mapped file: its resident pages are given back, and
what is read again afterwards is intact."""

from __future__ import annotations

import mmap

from backends import file_pages


def test_a_mapped_file_is_paged_out_and_still_reads_the_same(tmp_path):
    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * (4 << 12)          # 4 MiB
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        assert sum(m[i + 1] for i in range(0, len(m), 4096)) > 0       # touch every page
        assert file_pages.resident_bytes(path) >= len(data) - 4096
        assert file_pages.page_out(path) == 1
        assert file_pages.resident_bytes(path) < len(data) // 4
        assert m[:] == data                                           # faulted back in, unchanged


def test_nothing_mapped_is_nothing_to_do(tmp_path):
    path = tmp_path / "absent.bin"
    assert file_pages.mapped_ranges(path) == [] and file_pages.page_out(path) == 0
