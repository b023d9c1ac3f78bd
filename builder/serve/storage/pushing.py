"""Push: upload what differs, in parallel and multipart, and write the index last."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from backends.errors import InvalidArgumentError, StorageError
from builder.serve.storage.index import (
    INDEX_NAME,
    MB,
    FileEntry,
    HashCache,
    Progress,
    RepositoryIndex,
    S3Location,
    check_layout,
    parse_url,
    walk_repository,
)
from builder.serve.storage.s3 import (
    ProgressBar,
    TransferSettings,
    list_objects,
    make_client,
    rate,
    read_remote_index,
    transfer_manager,
    translated_errors,
)


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
        return rate(self.bytes_uploaded, self.seconds)

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
    found = read_remote_index(client, loc)
    if found is None:
        return None
    try:
        return RepositoryIndex.from_json(found[0], source=f"{loc}/{INDEX_NAME}")
    except StorageError:
        return None


def _upload_changed(client, loc: S3Location, root: Path, files: list[str], state: _PushState,
                    settings: TransferSettings, bar: "ProgressBar",
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
    manager = transfer_manager(client, settings)
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
    files, dirs = walk_repository(root)
    check_layout(files, dirs, source=str(root))
    client = make_client(endpoint_url, settings)
    report = PushReport(str(loc))
    with translated_errors("pushing to", loc, client):
        state = _PushState(list_objects(client, loc), _previous_index(client, loc))
        bar = ProgressBar(sum((root / rel).stat().st_size for rel in files), f"push {loc}", quiet, progress)
        hashes = hashes or HashCache()
        try:
            entries, same = _upload_changed(client, loc, root, files, state, settings, bar, hashes)
        finally:
            bar.close()
            hashes.save()
        etags = {**{k: v[1] for k, v in list_objects(client, loc).items()}, **{loc.key(r): t for r, t in same.items()}}
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
