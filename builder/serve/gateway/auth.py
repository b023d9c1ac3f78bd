"""Bearer-key checks for every /v1 route and for nginx's `auth_request` (GET /auth).

The guard keeps the key file's records in memory and re-reads them when the file's identity,
mtime or size changes (looked at no more than every 0.25 s), so a revocation or a new rate limit
applies to the running gateway within a second. Last-used times stay in memory and are flushed
to api-keys-usage.json at most every few seconds by `flush_usage`. Keys are never logged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from backends.errors import InvalidArgumentError
from builder.serve.gateway.errors import ApiError
from builder.serve.gateway.keys import (
    KEYS_FILE,
    USAGE_FILE,
    KeyRecord,
    read_records,
    read_usage,
    verify_against,
    write_json_atomic,
)
from builder.serve.gateway.ratelimit import RateLimiter

log = logging.getLogger("serverless_triton.gateway")
RECHECK_SECONDS = 0.25
CREATE_HINT = "create one with `serverless-triton api-keys create NAME`"


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def bearer(header: str | None) -> str:
    """The key of an `Authorization: Bearer KEY` header; 401 when there is none."""
    if not header:
        raise unauthorized("You didn't provide an API key: send it as 'Authorization: Bearer KEY' "
                           f"({CREATE_HINT})")
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized("The Authorization header must be 'Bearer KEY'")
    return key.strip()


class KeyGuard:
    """Verifies keys against the state directory's key file and applies their rate limits."""

    def __init__(self, state_dir: Path, limiter: RateLimiter | None = None):
        self.path = Path(state_dir) / KEYS_FILE
        self.usage_path = Path(state_dir) / USAGE_FILE
        self.limiter = limiter or RateLimiter()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._records: list[KeyRecord] = []
        self._used: dict[str, float] = {}

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def records(self, fresh: bool = False) -> list[KeyRecord]:
        """The current records; re-read when the file changed (checked at most every 0.25 s, or now
        with `fresh`: a key created a moment ago must work at once, and a stat is cheap)."""
        now = time.monotonic()
        with self._lock:
            if fresh or now - self._checked >= RECHECK_SECONDS:
                self._checked = now
                stamp = self._stat()
                if stamp != self._stamp:
                    try:
                        self._records = read_records(self.path)
                        self._stamp = stamp
                    except InvalidArgumentError as e:
                        log.error("%s; keeping the keys read before", e)
                    self.limiter.forget({r.name for r in self._records})
            return self._records

    def check(self, authorization: str | None) -> KeyRecord:
        """The key's record if the header carries a valid key within its rate limit; else 401 or 429."""
        key = bearer(authorization)
        records = self.records()
        record = verify_against(records, key)
        if record is None:
            records = self.records(fresh=True)
            record = verify_against(records, key)
        if record is None:
            hint = CREATE_HINT if not records else "check the key, or create a new one"
            raise unauthorized(f"Incorrect API key provided ({hint})")
        wait = self.limiter.hit(record.name, record.rate_limit_per_min)
        if wait is not None:
            raise ApiError(429, f"Rate limit reached for key '{record.name}': {record.rate_limit_per_min} "
                           f"requests per minute; retry in {wait} s", type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(wait)})
        with self._lock:
            self._used[record.name] = time.time()
        return record

    def flush_usage(self) -> None:
        """Merge in-memory last-used times into api-keys-usage.json (newest wins)."""
        with self._lock:
            used, self._used = self._used, {}
        if not used:
            return
        try:
            merged = read_usage(self.usage_path)
            for name, when in used.items():
                merged[name] = max(when, merged.get(name, 0.0))
            write_json_atomic(self.usage_path, merged)
        except OSError as e:
            log.warning("could not write %s: %s", self.usage_path, e)
            with self._lock:
                for name, when in used.items():
                    self._used[name] = max(when, self._used.get(name, 0.0))
