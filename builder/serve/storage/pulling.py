"""Pull: download what differs into staging, verify every sha256, swap the new version in atomically."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from backends.contract.manifest import sha256_file
from backends.errors import InvalidArgumentError, StorageError
from builder.serve.storage.index import (
    INDEX_NAME,
    MB,
    FileEntry,
    Progress,
    RepositoryIndex,
    S3Location,
    parse_url,
    read_local_index,
    target_path,
)
from builder.serve.storage.s3 import (
    ProgressBar,
    TransferSettings,
    error_code,
    make_client,
    rate,
    read_remote_index,
    transfer_manager,
    translated_errors,
)


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
    repaired: list[str] = field(default_factory=list)  # local files changed since the last pull, downloaded again
    swap: str = ""  # how the new version went in: SWAP_EXCHANGE, SWAP_RENAMES or SWAP_NEW ("": nothing to swap)

    @property
    def mb_per_s(self) -> float:
        return rate(self.bytes_downloaded, self.seconds)

    def summary(self) -> str:
        if not self.changed:
            return f"{self.directory} is already up to date with {self.url}"
        line = (f"pulled {self.url} into {self.directory}: {self.files_downloaded} files downloaded "
                f"({self.bytes_downloaded / MB:.1f} MiB), {self.files_reused} unchanged reused, "
                f"{self.files_resumed} resumed, in {self.seconds:.1f} s ({self.mb_per_s:.0f} MiB/s)")
        if self.repaired:
            line += f"; repaired {len(self.repaired)} local files changed since the last pull: {', '.join(self.repaired)}"
        if self.swap == SWAP_RENAMES:
            line += f"; swapped by two renames (no renameat2 here): {self.directory} was briefly absent"
        return line


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

    @property
    def stamps(self) -> Path:  # each file's stat as the last pull left it
        return self.root / "stamps.json"


def _stamp(path: Path) -> list[int] | None:
    """What changes when a file's bytes may have (any write moves ctime, even with mtime restored)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_stamps(area: _LocalArea) -> dict[str, list[int]]:
    try:
        data = json.loads(area.stamps.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # never recorded (or lost): every file is hashed once, then trusted again


def _record_stamps(area: _LocalArea, index: RepositoryIndex) -> None:
    """Remember each file's stat once nothing of ours will touch it again (links, unlinks of
    staging and the previous version all move ctime), so the next pull notices any other change."""
    stamps = {rel: _stamp(area.target / rel) for rel in index.files}
    tmp = area.stamps.with_name(area.stamps.name + ".tmp")
    with contextlib.suppress(OSError):  # losing the record costs one re-hash, never correctness
        tmp.write_text(json.dumps(stamps))
        os.replace(tmp, area.stamps)


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
          pool: ThreadPoolExecutor) -> tuple[dict, dict, list, list]:
    """Split the index into files reusable from the current version, verified in staging, to download,
    and the local files that changed since the last pull (to download again).

    A current file is trusted without reading it when the local index a previous pull wrote has its
    sha256 and its stat (size, mtime_ns, ctime_ns, inode) is the one that pull recorded; any other
    file of the right size (edited, touched, restored with its old mtime, or in a directory we never
    pulled into) is hashed.
    """
    reuse, resumed, candidates, suspect = {}, {}, [], set()
    stamps = _read_stamps(area) if current is not None else {}
    for rel, e in index.files.items():
        here = area.target / rel
        old = current.files.get(rel) if current else None
        same = old is not None and old.sha256 == e.sha256
        if same and _has_file(here, e.size) and stamps.get(rel) == _stamp(here):
            reuse[rel] = here
        else:
            if (current is None or same) and _has_file(here, e.size):
                candidates.append((rel, here))
                suspect.update([rel] if same else [])
            candidates += [(rel, area.staging / rel)] if _has_file(area.staging / rel, e.size) else []

    def verified(item: tuple[str, Path]) -> tuple[str, Path, bool]:
        rel, path = item
        return rel, path, sha256_file(path) == index.files[rel].sha256

    for rel, path, ok in pool.map(verified, candidates):
        if ok and rel not in reuse and rel not in resumed:
            (resumed if area.staging in path.parents else reuse)[rel] = path
    todo = [e for rel, e in index.files.items() if rel not in reuse and rel not in resumed]
    changed_here = [rel for rel in sorted(suspect) if rel not in reuse]
    return reuse, resumed, todo, changed_here


class _Mismatch(Exception):
    def __init__(self, rel: str):
        self.rel = rel


class _Missing(_Mismatch):
    """The object the index names is gone (a push settling its blobs meanwhile, or a damaged store)."""


class _DownloadSubscriber:
    """One s3transfer subscriber per object: give its known size (saves a HEAD), report progress,
    and queue its verification as soon as it lands."""

    def __init__(self, entry: FileEntry, bar: "ProgressBar", verify: Callable[[FileEntry], Any], checks: list):
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
                  settings: TransferSettings, bar: ProgressBar, pool: ThreadPoolExecutor) -> None:
    """Download into staging; hash each file as soon as it lands (overlapping the transfers)."""

    def verify(e: FileEntry) -> None:
        path = area.staging / e.path
        if path.stat().st_size != e.size or sha256_file(path) != e.sha256:
            path.unlink(missing_ok=True)
            raise _Mismatch(e.path)

    checks: list = []
    checked: set[str] = set()
    with transfer_manager(client, settings) as manager:   # joins its threads: every on_done has run
        futures = []
        for e in entries:
            dest = target_path(area.staging, e.path, checked=checked)
            dest.parent.mkdir(parents=True, exist_ok=True)
            subs = [_DownloadSubscriber(e, bar, lambda x: pool.submit(verify, x), checks)]
            futures.append((e, manager.download(loc.bucket, loc.key(e.object), str(dest), subscribers=subs)))
        for e, f in futures:
            _file_result(e, f, loc)
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
        code = error_code(e)
        if code in ("NoSuchKey", "404"):
            raise _Missing(entry.path) from None
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
SWAP_EXCHANGE = "renameat2(RENAME_EXCHANGE)"   # one atomic step: the directory never goes missing
SWAP_RENAMES = "two renames"                   # fallback: the directory is absent between them
SWAP_NEW = "rename"                            # nothing there yet: one plain rename


def _renameat2_exchange(a: Path, b: Path) -> int:
    """0, or the errno of renameat2(a, b, RENAME_EXCHANGE) (ENOSYS where libc has no renameat2)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    except (AttributeError, OSError):
        return errno.ENOSYS
    return ctypes.get_errno() if rc != 0 else 0


def exchange(a: Path, b: Path) -> str:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); return how it was done.

    Where the kernel or filesystem lacks it, fall back to two renames (SWAP_RENAMES): `b` is then
    missing for a moment, which a Triton load at that instant would notice, and the pull's summary
    says so. Never loses either directory.
    """
    err = _renameat2_exchange(a, b)
    if err == 0:
        return SWAP_EXCHANGE
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
    return SWAP_RENAMES


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _swap_in(area: _LocalArea, was_ours: bool) -> str:
    """Make `next` the repository; keep what it replaces as `previous` (or `original-*` if never pulled).
    Returns how it went in (SWAP_*)."""
    if not area.target.exists():
        area.target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(area.next, area.target)
        return SWAP_NEW
    method = exchange(area.next, area.target)
    with contextlib.suppress(OSError):  # the swap is done; tidying up may fail without harm
        if was_ours:
            _remove(area.previous)
            os.rename(area.next, area.previous)
        else:  # a directory we never pulled into: keep it whole, it may be someone's only copy
            os.rename(area.next, area.root / f"original-{time.strftime('%Y%m%d-%H%M%S')}")
    return method


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
    with translated_errors("pulling from", loc, client):
        found = read_remote_index(client, loc)
        if found is None:
            raise StorageError(f"no repository at {loc} (no {INDEX_NAME}): push one first, or fix the URL")
        raw, index_etag = found
        index = RepositoryIndex.from_json(raw, source=f"{loc}/{INDEX_NAME}")
        report.index = index
        with _locked(area), ThreadPoolExecutor(settings.hash_workers) as pool:
            current = read_local_index(area.target)
            reuse, resumed, todo, report.repaired = _plan(index, current, area, pool)
            if _up_to_date(index, current, reuse, area):
                shutil.rmtree(area.staging, ignore_errors=True)
                _record_stamps(area, index)  # files touched but intact: trusted again without hashing
                report.seconds = time.monotonic() - start
                return report
            bar = ProgressBar(sum(e.size for e in todo), f"pull {loc}", quiet, progress)
            try:
                _download_all(client, loc, area, todo, settings, bar, pool)
            except _Mismatch as m:
                if _changed_during_pull(client, loc, index_etag):
                    raise StorageError(f"the repository at {loc} changed during the pull (a push in progress?): "
                                       f"run the pull again; {area.target} was left unchanged") from None
                if isinstance(m, _Missing):
                    raise StorageError(f"{m.rel} is listed in {loc}/{INDEX_NAME} but missing from the store: "
                                       f"re-push the repository. {area.target} was left unchanged") from None
                raise StorageError(f"checksum mismatch for {m.rel} in {loc}: the stored object differs from the "
                                   f"index; re-push the repository. {area.target} was left unchanged") from None
            finally:
                bar.close()
            sources = {**reuse, **resumed, **{e.path: area.staging / e.path for e in todo}}
            try:
                _assemble(index, raw, area, sources)
                report.swap = _swap_in(area, was_ours=current is not None)
            except OSError as e:
                raise StorageError(f"cannot install the pulled repository at {area.target} ({e}): "
                                   "check free space and permissions; the previous version is unchanged") from None
            shutil.rmtree(area.staging, ignore_errors=True)
            _record_stamps(area, index)
    report.changed = True
    report.files_downloaded, report.bytes_downloaded = len(todo), sum(e.size for e in todo)
    report.files_reused = len(reuse)
    report.files_resumed, report.bytes_resumed = len(resumed), sum(index.files[r].size for r in resumed)
    report.seconds = time.monotonic() - start
    return report
