"""Disjoint port ranges for parallel test workers (see pytest_configure in tests/conftest.py)."""

from __future__ import annotations


def worker_port_range(worker: str, workers: int, ephemeral_low: int) -> str | None:
    """Worker gwI's share of the ports below the kernel's ephemeral range (which the kernel hands to
    outgoing connections and bind-to-0), e.g. gw0 20000-25999 and gw1 26000-31999 for two."""
    low, high = 20000, min(32000, ephemeral_low)
    width = (high - low) // max(workers, 1)
    if width < 200:
        return None
    i = int(worker.removeprefix("gw"))
    return f"{low + i * width}-{low + (i + 1) * width - 1}"
