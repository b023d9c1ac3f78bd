"""Per-key rate limits: at most N requests in any 60-second window (a sliding log).

A sliding log is exact (no burst of 2N across a minute boundary, as fixed windows allow) and
tells the client precisely when the next request will pass: Retry-After is the age at which the
oldest request of the window leaves it. Memory is N timestamps per key, which is small for
per-minute limits. The limit is read on every call, so a changed limit applies at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0


class RateLimiter:
    """`hit(name, limit)`: None when the request may pass (and counts it), else seconds to wait."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = WINDOW_SECONDS):
        self._clock, self._window = clock, window
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, name: str, limit: int | None) -> int | None:
        if limit is None:
            return None
        now = self._clock()
        with self._lock:
            log = self._hits.setdefault(name, deque())
            while log and log[0] <= now - self._window:
                log.popleft()
            if len(log) >= limit:
                return max(1, math.ceil(log[len(log) - limit] + self._window - now))
            log.append(now)
            return None

    def forget(self, keep: set[str]) -> None:
        """Drop the logs of keys that no longer exist."""
        with self._lock:
            for name in set(self._hits) - keep:
                del self._hits[name]
