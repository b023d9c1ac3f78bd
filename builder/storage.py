"""Sync a model repository with any S3-compatible object store: push, pull, refresh.

Layout in the store: `s3://BUCKET/PREFIX/<path>` mirrors the local repository file for file (so the
AWS CLI or Triton's own s3:// support can read it too), plus one index object,
`PREFIX/repository-index.json`, listing every file's path, size and sha256 and every empty
directory (S3 has no directories; Triton needs empty version folders such as `ensemble/1`).

Push uploads what differs and writes the index LAST; pull trusts nothing but the index: it downloads
into a staging directory, verifies every sha256, assembles the new version next to the old one and
swaps it in with one atomic exchange, so Triton never sees half a repository and a failed pull leaves
the previous one untouched. The local directory stays a real directory (not a symlink), because
Triton is given a resolved path and must keep seeing new versions at that path.

Index schema (version 1):
{"schema_version": 1, "generator": "serverless-triton X", "pushed_at": "ISO-8601",
 "files": [{"path": "m/1/model.py", "size": 123, "sha256": "<hex>", "etag": "<store ETag>"}...],
 "dirs": ["ensemble/1", ...]}
`etag` only lets the next push notice objects changed behind its back; readers ignore it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from builder import __version__
from builder.errors import InvalidArgumentError, ServeError, StorageError
from builder.manifest import sha256_file

INDEX_NAME = "repository-index.json"
INDEX_SCHEMA = 1
SKIPPED_DIRS = {"__pycache__"}  # written by Triton's Python backend at load time
SKIPPED_SUFFIXES = (".pyc",)
MB = 1 << 20

Progress = Callable[[int], None]


# --------------------------------------------------------------------------------- locations

@dataclass(frozen=True)
class S3Location:
    """`s3://bucket/prefix`; prefix has no leading or trailing slash ("" = bucket root)."""

    bucket: str
    prefix: str = ""

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @property
    def index_key(self) -> str:
        return self.key(INDEX_NAME)

    @property
    def list_prefix(self) -> str:
        """Listing prefix: with the slash, so `models/prod` never matches `models/prod2/...`."""
        return f"{self.prefix}/" if self.prefix else ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")


def is_s3_url(value: str | os.PathLike) -> bool:
    return str(value).startswith("s3://")


def parse_url(url: str) -> S3Location:
    if not is_s3_url(url):
        raise InvalidArgumentError(f"{url!r} is not an object-storage URL: write s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.match(bucket):
        raise InvalidArgumentError(f"{url!r} has no valid bucket name: write s3://BUCKET/PREFIX")
    if prefix:
        try:
            safe_relpath(prefix, source=url)
        except StorageError as e:
            raise InvalidArgumentError(str(e)) from None
    return S3Location(bucket, prefix)


# ------------------------------------------------------------------------------- path safety

_DRIVE = re.compile(r"^[A-Za-z]:")


def _path_problem(path: Any) -> str | None:
    if not isinstance(path, str) or not path:
        return "it is empty or not a string"
    if any(ord(c) < 32 for c in path):
        return "it contains control characters"
    if path.startswith("/") or _DRIVE.match(path):
        return "it is absolute"
    if "\\" in path:
        return "it contains a backslash"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "it has an empty, '.' or '..' component"
    return None


def safe_relpath(path: Any, *, source: str = "the index") -> str:
    """`path` itself if it is a plain relative POSIX path that stays inside its root.

    Index paths come from the store, which may be shared or compromised: a path that could escape
    the target directory is refused, never normalised into something else.
    """
    problem = _path_problem(path)
    if problem:
        raise StorageError(f"refusing path {path!r} from {source}: {problem}; "
                           "only plain relative paths inside the repository are allowed (re-push it)")
    return path


def target_path(root: Path, rel: str, *, source: str = "the index", checked: set[str] | None = None) -> Path:
    """root/rel, after checking rel is safe and that no symlinked folder leads it out of root.

    `checked` remembers folders already resolved, so a repository of many files costs one
    realpath per folder rather than per file.
    """
    path = Path(root) / safe_relpath(rel, source=source)
    folder = str(path.parent)
    if checked is None or folder not in checked:
        real_root, real = os.path.realpath(root), os.path.realpath(folder)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise StorageError(f"refusing path {rel!r} from {source}: it leads outside {root}")
        if checked is not None:
            checked.add(folder)
    return path


def check_layout(files: Iterable[str], dirs: Iterable[str] = (), *, source: str = "the index") -> None:
    """Refuse unsafe paths, duplicates, and a path that is both a file and a directory."""
    files, dirs = list(files), list(dirs)
    file_set: set[str] = set()
    for rel in files:
        safe_relpath(rel, source=source)
        if rel in file_set:
            raise StorageError(f"{source} lists {rel!r} twice: re-push the repository")
        file_set.add(rel)
    if INDEX_NAME in file_set:
        raise StorageError(f"{source} lists its own name {INDEX_NAME!r} as a file: re-push the repository")
    folders = [rel.split("/")[:-1] for rel in file_set]
    folders += [safe_relpath(d, source=source).split("/") for d in dirs]
    for parts in folders:
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent in file_set:
                raise StorageError(f"{source} lists {parent!r} both as a file and as a directory: "
                                   "re-push the repository")


# ------------------------------------------------------------------------------------- index

@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    etag: str | None = None


@dataclass
class RepositoryIndex:
    """What a repository holds: files with size and sha256, and its empty directories."""

    files: dict[str, FileEntry]
    dirs: list[str] = field(default_factory=list)
    generator: str = f"serverless-triton {__version__}"
    pushed_at: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def content(self) -> tuple:
        """What identifies the repository's content (ignores etags and timestamps)."""
        return (tuple(sorted((e.path, e.size, e.sha256) for e in self.files.values())), tuple(sorted(self.dirs)))

    def to_json(self) -> bytes:
        files = [{k: v for k, v in vars(e).items() if v is not None}
                 for e in sorted(self.files.values(), key=lambda e: e.path)]
        doc = {"schema_version": INDEX_SCHEMA, "generator": self.generator, "pushed_at": self.pushed_at,
               "files": files, "dirs": sorted(self.dirs)}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> "RepositoryIndex":
        """Parse and validate: every path safe, every size and digest well-formed."""
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise StorageError(f"{source} is not valid JSON ({e}): re-push the repository") from None
        if not isinstance(doc, dict) or doc.get("schema_version") != INDEX_SCHEMA:
            version = doc.get("schema_version") if isinstance(doc, dict) else None
            raise StorageError(f"{source} has schema version {version!r}, this tool reads {INDEX_SCHEMA}: "
                               "re-push the repository with this version")
        files_doc, dirs = doc.get("files"), doc.get("dirs", [])
        if not isinstance(files_doc, list) or not isinstance(dirs, list):
            raise StorageError(f"{source} is malformed ('files'/'dirs' must be lists): re-push the repository")
        entries = [_entry(item, source) for item in files_doc]
        check_layout([e.path for e in entries], dirs, source=source)
        return cls({e.path: e for e in entries}, list(dirs), str(doc.get("generator", "")),
                   str(doc.get("pushed_at", "")))

    def model_digests(self) -> dict[str, str]:
        """Digest per top-level directory (a Triton model): what `refresh` compares."""
        parts: dict[str, list[str]] = {}
        for e in self.files.values():
            if "/" in e.path:
                parts.setdefault(e.path.split("/")[0], []).append(f"f {e.path} {e.sha256}")
        for d in self.dirs:
            parts.setdefault(d.split("/")[0], []).append(f"d {d}")
        return {m: hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest() for m, v in parts.items()}


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _entry(item: Any, source: str) -> FileEntry:
    ok = (isinstance(item, dict) and isinstance(item.get("size"), int) and item["size"] >= 0
          and isinstance(item.get("sha256"), str) and _SHA256.match(item["sha256"]))
    if not ok:
        raise StorageError(f"{source} has a malformed file entry {str(item)[:120]!r}: re-push the repository")
    etag = item.get("etag")
    return FileEntry(safe_relpath(item.get("path"), source=source), item["size"], item["sha256"],
                     etag if isinstance(etag, str) else None)


def _skipped(name: str) -> bool:
    return name in SKIPPED_DIRS or name.endswith(SKIPPED_SUFFIXES)


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """(files, empty dirs) below root as POSIX paths; caches and our own index left out."""
    files, empty = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        kept = [f for f in sorted(filenames) if not _skipped(f) and os.path.isfile(os.path.join(dirpath, f))]
        if rel_dir == ".":
            kept = [f for f in kept if f != INDEX_NAME]
        files += [f if rel_dir == "." else f"{rel_dir}/{f}" for f in kept]
        if rel_dir != "." and not kept and not dirnames:
            empty.append(rel_dir)
    return files, empty


class HashCache:
    """sha256 of local files remembered by (size, mtime_ns, ctime_ns, inode), as git's index does:
    a file that did not change is not read again on the next push. Any write changes ctime, so a
    stale digest is never reused; a lost or unreadable cache only costs re-hashing."""

    MAX_ENTRIES = 200_000

    def __init__(self, path: Path | None = None):
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "serverless-triton"
        self.path = Path(path) if path else base / "file-hashes.json"
        self._lock = threading.Lock()
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, path: Path) -> str:
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = os.path.abspath(path)
        hit = self.entries.get(key)
        if isinstance(hit, list) and hit[:4] == stamp:
            return hit[4]
        digest = sha256_file(Path(path))
        with self._lock:
            self.entries[key] = stamp + [digest]
        return digest

    def save(self) -> None:
        with self._lock:
            entries = dict(list(self.entries.items())[-self.MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache: losing it costs time, not correctness


def scan_local(root: Path, *, workers: int = 4, hashes: HashCache | None = None) -> RepositoryIndex:
    """Index of a local repository, hashing files in parallel (hashlib releases the GIL)."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidArgumentError(f"{root} is not a directory: pass a model repository")
    files, dirs = _walk(root)
    check_layout(files, dirs, source=str(root))
    digest = hashes.sha256 if hashes else sha256_file
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda rel: digest(root / rel), files))
    entries = {rel: FileEntry(rel, (root / rel).stat().st_size, d) for rel, d in zip(files, digests, strict=True)}
    return RepositoryIndex(entries, dirs)


def read_local_index(directory: Path) -> RepositoryIndex | None:
    """The index a pull left in `directory`, or None (never pulled, or unreadable)."""
    path = Path(directory) / INDEX_NAME
    try:
        return RepositoryIndex.from_json(path.read_bytes(), source=str(path))
    except (OSError, StorageError):
        return None


# ---------------------------------------------------------------------- client and errors

@dataclass(frozen=True)
class TransferSettings:
    """Defaults chosen on loopback and small hosts: 8 MiB parts, 10 transfers in flight."""

    concurrency: int = 10
    part_size: int = 8 * MB
    hash_workers: int = 4


def make_client(endpoint_url: str | None, settings: TransferSettings):
    """An S3 client on boto3's standard credential chain; AWS_ENDPOINT_URL works without a flag."""
    import boto3
    from botocore.config import Config

    # Downloads skip botocore's CRC32 check: pull verifies every file's sha256, which is stronger.
    # Uploads keep it, so the store never accepts bytes that changed in transit.
    config = Config(max_pool_connections=settings.concurrency + 4, connect_timeout=5, read_timeout=60,
                    retries={"max_attempts": 3, "mode": "standard"}, response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _transfer_manager(client, settings: TransferSettings):
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    config = TransferConfig(multipart_threshold=settings.part_size, multipart_chunksize=settings.part_size,
                            max_concurrency=settings.concurrency, preferred_transfer_client="classic")
    return create_transfer_manager(client, config)


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed", "403", "Forbidden"}


def _root_cause(exc: BaseException) -> BaseException | None:
    """The botocore error behind s3transfer's wrappers (kept as context or last_exception), if any."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ClientError, BotoCoreError)):
            return cur
        cur = getattr(cur, "last_exception", None) or cur.__cause__ or cur.__context__
    return None


def _error_code(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError

    cause = _root_cause(exc)
    return str(cause.response.get("Error", {}).get("Code")) if isinstance(cause, ClientError) else None


def storage_error(exc: BaseException, *, doing: str, location: S3Location, endpoint: str) -> StorageError:
    """One actionable line for a failed store operation. Never includes a secret."""
    from botocore.exceptions import (ClientError, ConnectionClosedError, ConnectTimeoutError,
                                     EndpointConnectionError, NoCredentialsError, PartialCredentialsError,
                                     ReadTimeoutError, ResponseStreamingError)

    cause = _root_cause(exc) or exc
    if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"no usable credentials for {endpoint} while {doing} {location}: set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run on a host with an instance role")
    if isinstance(cause, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError,
                          ResponseStreamingError, ConnectionError, TimeoutError)):
        return StorageError(f"cannot reach the object store at {endpoint} while {doing} {location} "
                            f"({type(cause).__name__}): check --endpoint-url / AWS_ENDPOINT_URL and that "
                            "the store is up, then run the command again (a pull resumes)")
    if isinstance(cause, ClientError):
        code = str(cause.response.get("Error", {}).get("Code", "?"))
        if code == "NoSuchBucket":
            return StorageError(f"bucket {location.bucket!r} does not exist at {endpoint}: "
                                "create it or fix the URL")
        if code in _CREDENTIAL_CODES:
            return StorageError(f"the object store at {endpoint} refused the credentials ({code}) while {doing} "
                                f"{location}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE "
                                "and the bucket's permissions")
        message = str(cause.response.get("Error", {}).get("Message", ""))[:200]
        return StorageError(f"the object store at {endpoint} answered {code} while {doing} {location}: {message}")
    return StorageError(f"object storage failed while {doing} {location}: {type(cause).__name__}: {cause}")


@contextlib.contextmanager
def _translated(doing: str, location: S3Location, client) -> Iterator[None]:
    """Turn boto errors into StorageError at this module's edge; ours pass through untouched."""
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint = client.meta.endpoint_url
    try:
        yield
    except (StorageError, InvalidArgumentError):
        raise
    except (ClientError, BotoCoreError, ConnectionError, TimeoutError) as e:
        raise storage_error(e, doing=doing, location=location, endpoint=endpoint) from None
    except OSError as e:
        raise StorageError(f"local file error while {doing} {location}: {e}") from None
    except Exception as e:  # s3transfer wraps botocore errors in its own types
        if _root_cause(e) is not None or type(e).__module__.startswith(("s3transfer", "boto")):
            raise storage_error(e, doing=doing, location=location, endpoint=endpoint) from None
        raise


def _is_missing(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")


def _read_remote_index(client, loc: S3Location) -> tuple[bytes, str] | None:
    """(index bytes, its ETag), or None when the prefix holds no repository yet."""
    from botocore.exceptions import ClientError

    try:
        obj = client.get_object(Bucket=loc.bucket, Key=loc.index_key)
    except ClientError as e:
        if _is_missing(e):
            return None
        raise
    return obj["Body"].read(), obj.get("ETag", "")


def _list(client, loc: S3Location) -> dict[str, tuple[int, str]]:
    """{key: (size, etag)} of every object below the prefix."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.list_prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["Size"], obj.get("ETag", ""))
    return out


# ---------------------------------------------------------------------------------- progress

class _Bar:
    """A tqdm byte bar (unless quiet) plus an optional callback; safe to call from transfer threads."""

    def __init__(self, total: int, desc: str, quiet: bool, callback: Progress | None):
        from tqdm import tqdm

        self.callback = callback
        self.bar = None
        if not quiet and total > 0:
            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                            dynamic_ncols=True, leave=False)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(n)

    def subscriber(self):
        from s3transfer.subscribers import BaseSubscriber

        bar = self

        class _Sub(BaseSubscriber):
            def on_progress(self, future, bytes_transferred, **kwargs):
                bar(bytes_transferred)

        return _Sub()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else 0.0


# -------------------------------------------------------------------------------------- push

@dataclass
class PushReport:
    url: str
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    files_skipped: int = 0
    bytes_skipped: int = 0
    objects_deleted: int = 0
    seconds: float = 0.0
    uploaded: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return _rate(self.bytes_uploaded, self.seconds)

    def summary(self) -> str:
        line = (f"pushed {self.files_uploaded} files ({self.bytes_uploaded / MB:.1f} MiB) to {self.url}, "
                f"{self.files_skipped} unchanged skipped ({self.bytes_skipped / MB:.1f} MiB)")
        if self.objects_deleted:
            line += f", {self.objects_deleted} stale objects deleted"
        return line + f", in {self.seconds:.1f} s ({self.mb_per_s:.0f} MiB/s)"


@dataclass(frozen=True)
class _PushState:
    """What the store holds before a push: object sizes and ETags, and the index it last got."""

    listing: dict[str, tuple[int, str]]
    previous: RepositoryIndex | None

    def etag_if_same(self, client, loc: S3Location, entry: FileEntry) -> str | None:
        """The object's ETag if it already holds exactly `entry`, else None.

        Trusted: the previous index's sha256 while the object keeps the size and ETag it recorded.
        Otherwise (an interrupted push uploaded it but wrote no index) the sha256 that push stored
        in the object's metadata, read with one HEAD.
        """
        remote = self.listing.get(loc.key(entry.path))
        if remote is None or remote[0] != entry.size:
            return None
        old = self.previous.files.get(entry.path) if self.previous else None
        if old and old.sha256 == entry.sha256 and old.etag and old.etag == remote[1]:
            return remote[1]
        meta = client.head_object(Bucket=loc.bucket, Key=loc.key(entry.path))
        return meta.get("ETag") if meta.get("Metadata", {}).get("sha256") == entry.sha256 else None


def _previous_index(client, loc: S3Location) -> RepositoryIndex | None:
    """The store's current index, only to skip unchanged files; a broken one is simply ignored."""
    found = _read_remote_index(client, loc)
    if found is None:
        return None
    try:
        return RepositoryIndex.from_json(found[0], source=f"{loc}/{INDEX_NAME}")
    except StorageError:
        return None


def _upload_changed(client, loc: S3Location, root: Path, files: list[str], state: _PushState,
                    settings: TransferSettings, bar: "_Bar",
                    hashes: HashCache) -> tuple[list[FileEntry], dict[str, str]]:
    """Hash every file, and upload each one the store lacks as soon as its hash is known.

    Returns (every file's entry, {path: ETag} of those already in the store). Hashing runs on its
    own threads, so it overlaps the uploads instead of delaying them.
    """

    def decide(rel: str) -> tuple[FileEntry, str | None]:
        path = root / rel
        entry = FileEntry(rel, path.stat().st_size, hashes.sha256(path))
        return entry, state.etag_if_same(client, loc, entry)

    entries, same, uploads = [], {}, []
    manager = _transfer_manager(client, settings)
    try:
        with ThreadPoolExecutor(settings.hash_workers) as hashers:
            for done in as_completed([hashers.submit(decide, rel) for rel in files]):
                entry, etag = done.result()
                entries.append(entry)
                if etag is not None:
                    same[entry.path] = etag
                    bar(entry.size)
                    continue
                uploads.append(manager.upload(str(root / entry.path), loc.bucket, loc.key(entry.path),
                                              extra_args={"Metadata": {"sha256": entry.sha256}},
                                              subscribers=[bar.subscriber()]))
        for f in uploads:
            f.result()
    except BaseException:
        manager.shutdown(cancel=True)
        raise
    manager.shutdown()
    return entries, same


def _delete_stale(client, loc: S3Location, listing: dict, keep: set[str]) -> int:
    stale = sorted(k for k in listing if k not in keep)
    for i in range(0, len(stale), 1000):
        client.delete_objects(Bucket=loc.bucket,
                              Delete={"Objects": [{"Key": k} for k in stale[i:i + 1000]], "Quiet": True})
    return len(stale)


def push(local_dir: Path, url: str, *, endpoint_url: str | None = None, quiet: bool = False,
         delete: bool = False, settings: TransferSettings | None = None,
         progress: Progress | None = None, hashes: HashCache | None = None) -> PushReport:
    """Upload a repository; files whose object already matches are skipped; the index goes last.

    `delete` removes objects below the prefix that the new index does not list (after writing it).
    """
    settings = settings or TransferSettings()
    loc, root, start = parse_url(url), Path(local_dir), time.monotonic()
    if not root.is_dir():
        raise InvalidArgumentError(f"{root} is not a directory: pass the model repository to push")
    if delete and not loc.prefix:
        raise InvalidArgumentError(f"--delete at the root of bucket {loc.bucket!r} would delete every other object "
                                   "in it: push to s3://BUCKET/PREFIX")
    files, dirs = _walk(root)
    check_layout(files, dirs, source=str(root))
    client = make_client(endpoint_url, settings)
    report = PushReport(str(loc))
    with _translated("pushing to", loc, client):
        state = _PushState(_list(client, loc), _previous_index(client, loc))
        bar = _Bar(sum((root / rel).stat().st_size for rel in files), f"push {loc}", quiet, progress)
        hashes = hashes or HashCache()
        try:
            entries, same = _upload_changed(client, loc, root, files, state, settings, bar, hashes)
        finally:
            bar.close()
            hashes.save()
        etags = {**{k: v[1] for k, v in _list(client, loc).items()}, **{loc.key(r): t for r, t in same.items()}}
        index = RepositoryIndex({e.path: FileEntry(e.path, e.size, e.sha256, etags.get(loc.key(e.path)))
                                 for e in entries}, dirs,
                                pushed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        client.put_object(Bucket=loc.bucket, Key=loc.index_key, Body=index.to_json(), ContentType="application/json")
        if delete:
            keep = {loc.key(r) for r in index.files} | {loc.index_key}
            report.objects_deleted = _delete_stale(client, loc, state.listing, keep)
    uploaded = [e for e in entries if e.path not in same]
    report.files_uploaded, report.bytes_uploaded = len(uploaded), sum(e.size for e in uploaded)
    report.files_skipped, report.bytes_skipped = len(same), sum(e.size for e in entries if e.path in same)
    report.uploaded = sorted(e.path for e in uploaded)
    report.seconds = time.monotonic() - start
    return report


# -------------------------------------------------------------------------------------- pull

@dataclass
class PullReport:
    url: str
    directory: str
    files_downloaded: int = 0
    bytes_downloaded: int = 0
    files_reused: int = 0  # unchanged: hard-linked from the current local version
    files_resumed: int = 0  # verified in the staging area by an earlier, interrupted pull
    bytes_resumed: int = 0
    changed: bool = False  # False: the local repository already matched the index
    seconds: float = 0.0
    index: RepositoryIndex | None = None

    @property
    def mb_per_s(self) -> float:
        return _rate(self.bytes_downloaded, self.seconds)

    def summary(self) -> str:
        if not self.changed:
            return f"{self.directory} is already up to date with {self.url}"
        return (f"pulled {self.url} into {self.directory}: {self.files_downloaded} files downloaded "
                f"({self.bytes_downloaded / MB:.1f} MiB), {self.files_reused} unchanged reused, "
                f"{self.files_resumed} resumed, in {self.seconds:.1f} s ({self.mb_per_s:.0f} MiB/s)")


@dataclass(frozen=True)
class _LocalArea:
    """Work folders of one local repository, in a hidden sibling (same filesystem: renames are atomic)."""

    target: Path

    @property
    def root(self) -> Path:
        return self.target.parent / f".{self.target.name}.sync"

    @property
    def staging(self) -> Path:  # verified downloads; survives a failed pull so the next one resumes
        return self.root / "staging"

    @property
    def next(self) -> Path:  # the new version, assembled before the swap
        return self.root / "next"

    @property
    def previous(self) -> Path:  # the version before the last swap
        return self.root / "previous"


@contextlib.contextmanager
def _locked(area: _LocalArea) -> Iterator[None]:
    area.root.mkdir(parents=True, exist_ok=True)
    with open(area.root / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(f"another pull into {area.target} is running: wait for it to finish") from None
        yield


def _has_file(path: Path, size: int) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size == size
    except OSError:
        return False


def _plan(index: RepositoryIndex, current: RepositoryIndex | None, area: _LocalArea,
          pool: ThreadPoolExecutor) -> tuple[dict, dict, list]:
    """Split the index into files reusable from the current version, verified in staging, to download.

    Current files are trusted by the local index a previous pull wrote (and their size); a directory
    we never pulled into has each candidate hashed instead.
    """
    reuse, resumed, candidates = {}, {}, []
    for rel, e in index.files.items():
        here = area.target / rel
        old = current.files.get(rel) if current else None
        if old and old.sha256 == e.sha256 and _has_file(here, e.size):
            reuse[rel] = here
        else:
            candidates += [(rel, here)] if current is None and _has_file(here, e.size) else []
            candidates += [(rel, area.staging / rel)] if _has_file(area.staging / rel, e.size) else []

    def verified(item: tuple[str, Path]) -> tuple[str, Path, bool]:
        rel, path = item
        return rel, path, sha256_file(path) == index.files[rel].sha256

    for rel, path, ok in pool.map(verified, candidates):
        if ok and rel not in reuse and rel not in resumed:
            (resumed if area.staging in path.parents else reuse)[rel] = path
    todo = [e for rel, e in index.files.items() if rel not in reuse and rel not in resumed]
    return reuse, resumed, todo


class _Mismatch(Exception):
    def __init__(self, rel: str):
        self.rel = rel


class _DownloadSubscriber:
    """One s3transfer subscriber per object: give its known size (saves a HEAD), report progress,
    and queue its verification as soon as it lands."""

    def __init__(self, entry: FileEntry, bar: "_Bar", verify: Callable[[FileEntry], Any], checks: list):
        self.entry, self.bar, self.verify, self.checks = entry, bar, verify, checks

    def on_queued(self, future, **kwargs):
        future.meta.provide_transfer_size(self.entry.size)

    def on_progress(self, future, bytes_transferred, **kwargs):
        self.bar(bytes_transferred)

    def on_done(self, future, **kwargs):
        try:
            future.result()
        except BaseException:
            return  # reported by the caller's future.result()
        self.checks.append((self.entry.path, self.verify(self.entry)))


def _download_all(client, loc: S3Location, area: _LocalArea, entries: list[FileEntry],
                  settings: TransferSettings, bar: _Bar, pool: ThreadPoolExecutor) -> None:
    """Download into staging; hash each file as soon as it lands (overlapping the transfers)."""

    def verify(e: FileEntry) -> None:
        path = area.staging / e.path
        if path.stat().st_size != e.size or sha256_file(path) != e.sha256:
            path.unlink(missing_ok=True)
            raise _Mismatch(e.path)

    checks: list = []
    checked: set[str] = set()
    manager = _transfer_manager(client, settings)
    try:
        futures = []
        for e in entries:
            dest = target_path(area.staging, e.path, checked=checked)
            dest.parent.mkdir(parents=True, exist_ok=True)
            subs = [_DownloadSubscriber(e, bar, lambda x: pool.submit(verify, x), checks)]
            futures.append((e, manager.download(loc.bucket, loc.key(e.path), str(dest), subscribers=subs)))
        for e, f in futures:
            _file_result(e, f, loc)
    except BaseException:
        manager.shutdown(cancel=True)
        raise
    manager.shutdown()  # joins the transfer threads, so every on_done has run
    for _, check in checks:
        check.result()
    verified = {rel for rel, _ in checks}
    for e in entries:
        if e.path not in verified:  # belt and braces: never install an unverified file
            verify(e)


def _file_result(entry: FileEntry, future, loc: S3Location) -> None:
    """A finished download, with errors that are about this one object named after it."""
    try:
        future.result()
    except Exception as e:
        code = _error_code(e)
        if code in ("NoSuchKey", "404"):
            raise StorageError(f"{entry.path} is listed in {loc}/{INDEX_NAME} but missing from the store: "
                               "re-push the repository") from None
        if code == "InvalidRange":
            raise _Mismatch(entry.path) from None
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _assemble(index: RepositoryIndex, raw_index: bytes, area: _LocalArea, sources: dict[str, Path]) -> None:
    """Build the new version in `next`: hard links (copies across devices), folders, then the index."""
    _remove(area.next)
    area.next.mkdir(parents=True)
    checked: set[str] = set()
    for d in index.dirs:
        target_path(area.next, d, checked=checked).mkdir(parents=True, exist_ok=True)
    for rel, src in sources.items():
        dst = target_path(area.next, rel, checked=checked)
        dst.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(src, dst)
    (area.next / INDEX_NAME).write_bytes(raw_index)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE).

    Where the kernel or filesystem lacks it, fall back to two renames: `b` is then missing for a
    moment, which a Triton load at that instant would notice. Never loses either directory.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
        err = ctypes.get_errno() if rc != 0 else 0
    except (AttributeError, OSError):
        rc, err = -1, errno.ENOSYS
    if rc == 0:
        return
    if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        raise OSError(err, os.strerror(err), str(b))
    aside = a.with_name(a.name + ".aside")
    os.rename(b, aside)
    try:
        os.rename(a, b)
    except OSError:
        os.rename(aside, b)
        raise
    os.rename(aside, a)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _swap_in(area: _LocalArea, was_ours: bool) -> None:
    """Make `next` the repository; keep what it replaces as `previous` (or `original-*` if never pulled)."""
    if not area.target.exists():
        area.target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(area.next, area.target)
        return
    exchange(area.next, area.target)
    with contextlib.suppress(OSError):  # the swap is done; tidying up may fail without harm
        if was_ours:
            _remove(area.previous)
            os.rename(area.next, area.previous)
        else:  # a directory we never pulled into: keep it whole, it may be someone's only copy
            os.rename(area.next, area.root / f"original-{time.strftime('%Y%m%d-%H%M%S')}")


def _changed_during_pull(client, loc: S3Location, etag: str) -> bool:
    try:
        return client.head_object(Bucket=loc.bucket, Key=loc.index_key).get("ETag") != etag
    except Exception:
        return False


def _up_to_date(index: RepositoryIndex, current: RepositoryIndex | None, reuse: dict, area: _LocalArea) -> bool:
    return (current is not None and current.content() == index.content() and len(reuse) == len(index.files)
            and all((area.target / d).is_dir() for d in index.dirs))


def pull(url: str, local_dir: Path, *, endpoint_url: str | None = None, quiet: bool = False,
         settings: TransferSettings | None = None, progress: Progress | None = None) -> PullReport:
    """Make `local_dir` an exact, verified copy of the repository at `url`, swapped in atomically.

    On any failure the previous local repository is untouched; verified downloads stay in the
    staging area, so the next pull resumes instead of starting over.
    """
    settings = settings or TransferSettings()
    loc, start = parse_url(url), time.monotonic()
    area = _LocalArea(Path(local_dir).absolute())
    if area.target.exists() and not area.target.is_dir():
        raise InvalidArgumentError(f"{area.target} exists and is not a directory: pick another target")
    client = make_client(endpoint_url, settings)
    report = PullReport(str(loc), str(area.target))
    with _translated("pulling from", loc, client):
        found = _read_remote_index(client, loc)
        if found is None:
            raise StorageError(f"no repository at {loc} (no {INDEX_NAME}): push one first, or fix the URL")
        raw, index_etag = found
        index = RepositoryIndex.from_json(raw, source=f"{loc}/{INDEX_NAME}")
        report.index = index
        with _locked(area), ThreadPoolExecutor(settings.hash_workers) as pool:
            current = read_local_index(area.target)
            reuse, resumed, todo = _plan(index, current, area, pool)
            if _up_to_date(index, current, reuse, area):
                shutil.rmtree(area.staging, ignore_errors=True)
                report.seconds = time.monotonic() - start
                return report
            bar = _Bar(sum(e.size for e in todo), f"pull {loc}", quiet, progress)
            try:
                _download_all(client, loc, area, todo, settings, bar, pool)
            except _Mismatch as m:
                if _changed_during_pull(client, loc, index_etag):
                    raise StorageError(f"the repository at {loc} changed during the pull (a push in progress?): "
                                       "run the pull again") from None
                raise StorageError(f"checksum mismatch for {m.rel} in {loc}: the stored object differs from the "
                                   f"index; re-push the repository. {area.target} was left unchanged") from None
            finally:
                bar.close()
            sources = {**reuse, **resumed, **{e.path: area.staging / e.path for e in todo}}
            try:
                _assemble(index, raw, area, sources)
                _swap_in(area, was_ours=current is not None)
            except OSError as e:
                raise StorageError(f"cannot install the pulled repository at {area.target} ({e}): "
                                   "check free space and permissions; the previous version is unchanged") from None
            shutil.rmtree(area.staging, ignore_errors=True)
    report.changed = True
    report.files_downloaded, report.bytes_downloaded = len(todo), sum(e.size for e in todo)
    report.files_reused = len(reuse)
    report.files_resumed, report.bytes_resumed = len(resumed), sum(index.files[r].size for r in resumed)
    report.seconds = time.monotonic() - start
    return report


# ----------------------------------------------------------------------------------- refresh

@dataclass
class RefreshReport:
    pull: PullReport
    loaded: list[str] = field(default_factory=list)  # changed or new models (re)loaded into Triton
    unloaded: list[str] = field(default_factory=list)  # models gone from the repository
    not_loaded: list[str] = field(default_factory=list)  # changed, but not loaded now: next load sees them
    failed: dict[str, str] = field(default_factory=dict)  # model -> Triton's reason

    def summary(self) -> str:
        parts = [self.pull.summary()]
        for label, names in (("reloaded", self.loaded), ("unloaded", self.unloaded),
                             ("changed but not loaded", self.not_loaded)):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        if self.failed:
            parts.append("failed: " + "; ".join(f"{m}: {r}" for m, r in self.failed.items()))
        return "; ".join(parts)


def model_changes(old: RepositoryIndex | None, new: RepositoryIndex) -> tuple[list[str], list[str], list[str]]:
    """(added, changed, removed) top-level models. Without an old index every model counts as changed."""
    before, after = (old.model_digests() if old else {}), new.model_digests()
    if old is None:
        return [], sorted(after), []
    added = sorted(m for m in after if m not in before)
    changed = sorted(m for m in after if m in before and before[m] != after[m])
    removed = sorted(m for m in before if m not in after)
    return added, changed, removed


def _server(url: str) -> str:
    url = url.rstrip("/")
    return url if "://" in url else f"http://{url}"


def _post(url: str, body: dict, timeout: float) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _loaded_models(server: str) -> set[str]:
    try:
        status, body = _post(f"{server}/v2/repository/index", {}, 10)
    except (urllib.error.URLError, OSError) as e:
        raise ServeError(f"cannot reach Triton at {server} ({e}): is `serverless-triton serve` running "
                         "there? Pass its HTTP address with --server") from None
    if status != 200:
        raise ServeError(f"Triton at {server} answered {status} to its repository index: {body[:200]}")
    return {m["name"] for m in json.loads(body) if m.get("state") in ("READY", "LOADING")}


def _error_text(body: str) -> str:
    try:
        return str(json.loads(body).get("error", body))
    except ValueError:
        return body[:300]


def refresh(url: str, local_dir: Path, server_url: str, *, endpoint_url: str | None = None,
            quiet: bool = False, timeout: float = 600.0, settings: TransferSettings | None = None) -> RefreshReport:
    """Pull the new index into the served directory, then reload only the models that changed.

    Triton (explicit model control) keeps serving a model's old version until its new one is ready
    and never touches the others, so requests to unchanged models never fail.
    """
    server = _server(server_url)
    loaded_now = _loaded_models(server)  # fail before pulling if the server is not there
    old = read_local_index(Path(local_dir))
    report = RefreshReport(pull(url, local_dir, endpoint_url=endpoint_url, quiet=quiet, settings=settings))
    if not report.pull.changed:
        return report
    added, changed, removed = model_changes(old, report.pull.index)
    for name in added + changed:
        if name not in loaded_now and name not in added:
            report.not_loaded.append(name)
            continue
        status, body = _post(f"{server}/v2/repository/models/{name}/load", {}, timeout)
        (report.loaded.append(name) if status == 200 else report.failed.__setitem__(name, _error_text(body)))
    for name in removed:
        if name in loaded_now:
            status, body = _post(f"{server}/v2/repository/models/{name}/unload",
                                 {"parameters": {"unload_dependents": False}}, timeout)
            (report.unloaded.append(name) if status == 200 else report.failed.__setitem__(name, _error_text(body)))
    return report


def default_cache_dir(url: str, endpoint_url: str | None) -> Path:
    """Where `serve --repository s3://...` keeps its local copy: one folder per store location."""
    loc = parse_url(url)
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
    tag = hashlib.sha256(f"{endpoint}|{loc}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{loc.bucket}-{loc.prefix}").strip("-")[:60]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "serverless-triton" / "repositories"
    return base / f"{slug}-{tag}"


__all__ = [
    "INDEX_NAME", "S3Location", "FileEntry", "RepositoryIndex", "TransferSettings", "PushReport", "PullReport",
    "RefreshReport", "parse_url", "is_s3_url", "safe_relpath", "target_path", "check_layout", "scan_local",
    "read_local_index", "push", "pull", "refresh", "model_changes", "exchange", "default_cache_dir",
    "storage_error",
]
