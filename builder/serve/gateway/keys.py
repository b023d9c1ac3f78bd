"""API keys: created and revoked by the CLI, verified by the gateway, stored hashed only.

`<state-dir>/api-keys.json` holds one record per key: its name, the sha256 of the key (keys are
40 random URL-safe characters, so a fast hash is enough; there is nothing to brute-force), when
it was created and its rate limit. The plaintext exists once, in `create`'s return value. Writes
go through a temp file and `os.replace` under an fcntl lock, so a reader (the gateway, re-reading
on every change) sees the old file or the new one, never half of one. Last-used times are kept
by the gateway and flushed to a separate `api-keys-usage.json`, so the key file stays the CLI's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backends.errors import InvalidArgumentError

KEYS_FILE = "api-keys.json"
USAGE_FILE = "api-keys-usage.json"
LOCK_FILE = "api-keys.lock"
KEY_PREFIX = "st-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """`st-` and 40 URL-safe random characters (240 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(30)


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored: never the key itself."""

    name: str
    hash: str
    created: float
    rate_limit_per_min: int | None = None
    prefix: str = ""             # the first characters, so an operator can tell keys apart

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRecord:
        return cls(name=str(data["name"]), hash=str(data["hash"]), created=float(data.get("created", 0)),
                   rate_limit_per_min=data.get("rate_limit_per_min"), prefix=str(data.get("prefix", "")))


@dataclass(frozen=True)
class KeyInfo:
    """What `list` shows: name, created, last used, rate limit (never the key or its hash)."""

    name: str
    created: float
    last_used: float | None
    rate_limit_per_min: int | None
    prefix: str


def check_key_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise InvalidArgumentError(f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                                   "starting with a letter or digit (e.g. my-app)")
    return name


def check_rate_limit(per_min: int | None) -> int | None:
    if per_min is not None and (not isinstance(per_min, int) or per_min < 1):
        raise InvalidArgumentError(f"rate limit must be a positive number of requests per minute, got {per_min!r}")
    return per_min


def read_records(path: Path) -> list[KeyRecord]:
    """The records of a key file; none if it does not exist. A damaged file is an error, not 'no keys'."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"{path} is not a readable key file ({e}): restore it or delete it "
                                   "and create the keys again") from None
    return [KeyRecord.from_json(k) for k in data.get("keys", [])]


def read_usage(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_json_atomic(path: Path, data: Any, mode: int = 0o600) -> None:
    """Write a temp file next to `path`, fsync it, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify_against(records: list[KeyRecord], key: str) -> KeyRecord | None:
    """The record whose hash matches `key` (constant-time comparison), or None."""
    if not key:
        return None
    digest = hash_key(key)
    found = None
    for record in records:
        if hmac.compare_digest(record.hash, digest):
            found = record
    return found


class KeyStore:
    """The key file of one state directory: create, list, revoke, set a rate limit, verify."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / KEYS_FILE
        self.usage_path = self.state_dir / USAGE_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, records: list[KeyRecord]) -> None:
        write_json_atomic(self.path, {"version": 1, "keys": [asdict(r) for r in records]})

    def records(self) -> list[KeyRecord]:
        return read_records(self.path)

    def create(self, name: str, rate_limit_per_min: int | None = None) -> str:
        """A new key named `name`; returns the plaintext, which is not stored anywhere."""
        check_key_name(name)
        check_rate_limit(rate_limit_per_min)
        key = new_key()
        with self._locked():
            records = self.records()
            if any(r.name == name for r in records):
                raise InvalidArgumentError(f"a key named {name!r} already exists: pick another name, or revoke "
                                           f"it first (serverless-triton api-keys revoke {name})")
            records.append(KeyRecord(name=name, hash=hash_key(key), created=time.time(),
                                     rate_limit_per_min=rate_limit_per_min, prefix=key[:7]))
            self._write(records)
        return key

    def revoke(self, name: str) -> None:
        with self._locked():
            records = self.records()
            kept = [r for r in records if r.name != name]
            if len(kept) == len(records):
                raise InvalidArgumentError(f"no key named {name!r}: see `serverless-triton api-keys list`")
            self._write(kept)

    def set_rate_limit(self, name: str, rate_limit_per_min: int | None) -> None:
        """Change (or, with None, remove) a key's limit; the running gateway applies it within a second."""
        check_rate_limit(rate_limit_per_min)
        with self._locked():
            records = self.records()
            if not any(r.name == name for r in records):
                raise InvalidArgumentError(f"no key named {name!r}: see `serverless-triton api-keys list`")
            self._write([KeyRecord(r.name, r.hash, r.created, rate_limit_per_min, r.prefix) if r.name == name
                         else r for r in records])

    def list(self) -> list[KeyInfo]:
        usage = read_usage(self.usage_path)
        return [KeyInfo(r.name, r.created, usage.get(r.name), r.rate_limit_per_min, r.prefix)
                for r in self.records()]

    def verify(self, key: str) -> KeyRecord | None:
        return verify_against(self.records(), key)
