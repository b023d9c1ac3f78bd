"""Pull: download what differs into staging, verify every sha256, swap the new version in atomically."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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

    @property
    def mb_per_s(self) -> float:
        return rate(self.bytes_downloaded, self.seconds)

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
    manager = transfer_manager(client, settings)
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
        code = error_code(e)
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
    with translated_errors("pulling from", loc, client):
        found = read_remote_index(client, loc)
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
            bar = ProgressBar(sum(e.size for e in todo), f"pull {loc}", quiet, progress)
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
