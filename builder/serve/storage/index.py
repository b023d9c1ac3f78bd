"""Where things are and what they hold: s3:// locations, path safety, the repository index, local
scans and the file-hash cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from backends.contract.manifest import RUNTIME_DIR, sha256_file
from backends.errors import InvalidArgumentError, StorageError
from builder import __version__
from builder.paths import cache_root

INDEX_NAME = "repository-index.json"
INDEX_SCHEMA = 1
BLOBS_DIR = ".blobs"  # PREFIX/.blobs/<sha256>: a push's new content until the index names it (see pushing.py)
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
    reserved = next((rel for rel in [*file_set, *dirs] if rel.split("/")[0] == BLOBS_DIR), None)
    if reserved:
        raise StorageError(f"{source} has {reserved!r}, but {BLOBS_DIR!r} at the top is where pushes stage "
                           "new content: rename that folder")
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
    key: str | None = None  # object holding the bytes, relative to the prefix, when not `path` (a staged blob)

    @property
    def object(self) -> str:
        return self.key or self.path


def blob_key(sha256: str) -> str:
    return f"{BLOBS_DIR}/{sha256}"


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
        """Digest per top-level directory that is a Triton model (not the runtime code, which models
        point at by path, so a new runtime changes them too): what `refresh` compares."""
        parts: dict[str, list[str]] = {}
        for e in self.files.values():
            if "/" in e.path and not e.path.startswith(RUNTIME_DIR + "/"):
                parts.setdefault(e.path.split("/")[0], []).append(f"f {e.path} {e.sha256}")
        for d in self.dirs:
            if d.split("/")[0] == RUNTIME_DIR:
                continue
            parts.setdefault(d.split("/")[0], []).append(f"d {d}")
        return {m: hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest() for m, v in parts.items()}


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _entry(item: Any, source: str) -> FileEntry:
    ok = (isinstance(item, dict) and isinstance(item.get("size"), int) and item["size"] >= 0
          and isinstance(item.get("sha256"), str) and _SHA256.match(item["sha256"]))
    if not ok:
        raise StorageError(f"{source} has a malformed file entry {str(item)[:120]!r}: re-push the repository")
    etag, key = item.get("etag"), item.get("key")
    if key is not None and key != blob_key(item["sha256"]):
        raise StorageError(f"{source} has a file entry whose key {str(key)[:80]!r} is not its blob "
                           f"({blob_key('<sha256>')}): re-push the repository")
    return FileEntry(safe_relpath(item.get("path"), source=source), item["size"], item["sha256"],
                     etag if isinstance(etag, str) else None, key)


def _skipped(name: str) -> bool:
    return name in SKIPPED_DIRS or name.endswith(SKIPPED_SUFFIXES)


def walk_repository(root: Path) -> tuple[list[str], list[str]]:
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
        self.path = Path(path) if path else cache_root() / "file-hashes.json"
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
    files, dirs = walk_repository(root)
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
