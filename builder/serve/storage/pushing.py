"""Push: upload what differs, in parallel and multipart, and write the index last.

New content never overwrites an object the current index names. It goes up under
`PREFIX/.blobs/<sha256>`; the index is then written naming those blobs (the commit: readers see the
complete new version), the blobs are copied onto their mirror keys inside the store, the index is
written again naming the mirror keys, and the blobs are deleted. A push cut off at any point
leaves an index whose every object is intact: the previous version before the commit, the new one
after it. (Only tools that read the mirror keys without the index, such as `aws s3 sync`, can see
a mix while the copies run.)
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from backends.errors import InvalidArgumentError, StorageError
from builder.serve.storage.index import (
    BLOBS_DIR,
    INDEX_NAME,
    MB,
    FileEntry,
    HashCache,
    Progress,
    RepositoryIndex,
    S3Location,
    blob_key,
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

    def etag_if_same(self, client, loc: S3Location, entry: FileEntry, key: str | None = None) -> str | None:
        """The ETag of the object at `key` (default: the entry's mirror key) if it already holds
        exactly `entry`, else None.

        Trusted: the previous index's sha256 while the object keeps the size and ETag it recorded.
        Otherwise (an interrupted push uploaded it but wrote no index) the sha256 that push stored
        in the object's metadata, read with one HEAD.
        """
        rel = key or entry.path
        remote = self.listing.get(loc.key(rel))
        if remote is None or remote[0] != entry.size:
            return None
        old = self.previous.files.get(entry.path) if self.previous and key is None else None
        if old and old.sha256 == entry.sha256 and old.etag and old.etag == remote[1] and not old.key:
            return remote[1]
        meta = client.head_object(Bucket=loc.bucket, Key=loc.key(rel))
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
                    settings: TransferSettings, bar: ProgressBar,
                    hashes: HashCache) -> tuple[list[FileEntry], dict[str, str], set[str]]:
    """Hash every file, and upload each one the store lacks to its blob as soon as its hash is known.

    Returns (every file's entry, {path: ETag} of those already under their mirror key, paths whose
    blob was already there from an interrupted push). Hashing runs on its own threads, so it
    overlaps the uploads instead of delaying them.
    """

    def decide(rel: str) -> tuple[FileEntry, str | None, bool]:
        path = root / rel
        entry = FileEntry(rel, path.stat().st_size, hashes.sha256(path))
        etag = state.etag_if_same(client, loc, entry)
        staged = etag is None and state.etag_if_same(client, loc, entry, blob_key(entry.sha256)) is not None
        return entry, etag, staged

    entries, same, staged, uploads, blobs = [], {}, set(), [], set()
    with transfer_manager(client, settings) as manager:
        with ThreadPoolExecutor(settings.hash_workers) as hashers:
            for done in as_completed([hashers.submit(decide, rel) for rel in files]):
                entry, etag, already = done.result()
                entries.append(entry)
                if etag is not None:
                    same[entry.path] = etag
                elif already:
                    staged.add(entry.path)
                if etag is not None or already or entry.sha256 in blobs:   # identical files share one blob
                    bar(entry.size)
                    continue
                blobs.add(entry.sha256)
                uploads.append(manager.upload(str(root / entry.path), loc.bucket, loc.key(blob_key(entry.sha256)),
                                              extra_args={"Metadata": {"sha256": entry.sha256}},
                                              subscribers=[bar.subscriber()]))
        for f in uploads:
            f.result()
    return entries, same, staged


def _put_index(client, loc: S3Location, index: RepositoryIndex) -> None:
    client.put_object(Bucket=loc.bucket, Key=loc.index_key, Body=index.to_json(), ContentType="application/json")


def _settle(client, loc: S3Location, entries: list[FileEntry], settings: TransferSettings) -> None:
    """Copy each staged blob onto its mirror key, inside the store (multipart above the part size;
    the sha256 metadata travels with it)."""
    with transfer_manager(client, settings) as manager:
        copies = [manager.copy({"Bucket": loc.bucket, "Key": loc.key(e.object)}, loc.bucket, loc.key(e.path))
                  for e in entries]
        for f in copies:
            f.result()


def _delete_blobs(client, loc: S3Location) -> None:
    """Every staged blob below the prefix: this push's (settled now) and any an interrupted one left."""
    blobs = [k for k in list_objects(client, loc) if k.startswith(loc.key(BLOBS_DIR) + "/")]
    for i in range(0, len(blobs), 1000):
        client.delete_objects(Bucket=loc.bucket,
                              Delete={"Objects": [{"Key": k} for k in blobs[i:i + 1000]], "Quiet": True})


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
            entries, same, resumed = _upload_changed(client, loc, root, files, state, settings, bar, hashes)
        finally:
            bar.close()
            hashes.save()
        pushed_at = datetime.now(UTC).isoformat(timespec="seconds")
        staged = [FileEntry(e.path, e.size, e.sha256, key=blob_key(e.sha256)) for e in entries if e.path not in same]
        if staged:  # the commit: readers now get the new version, every byte from objects no one overwrites
            _put_index(client, loc, RepositoryIndex({**{e.path: FileEntry(e.path, e.size, e.sha256, same[e.path])
                                                        for e in entries if e.path in same},
                                                     **{e.path: e for e in staged}}, dirs, pushed_at=pushed_at))
            _settle(client, loc, staged, settings)
        listing = list_objects(client, loc)
        etags = {**{k: v[1] for k, v in listing.items()}, **{loc.key(r): t for r, t in same.items()}}
        index = RepositoryIndex({e.path: FileEntry(e.path, e.size, e.sha256, etags.get(loc.key(e.path)))
                                 for e in entries}, dirs, pushed_at=pushed_at)
        _put_index(client, loc, index)
        if any(k.startswith(loc.key(BLOBS_DIR) + "/") for k in listing):
            _delete_blobs(client, loc)
        if delete:
            keep = {loc.key(r) for r in index.files} | {loc.index_key}
            stale = {k: v for k, v in state.listing.items() if not k.startswith(loc.key(BLOBS_DIR) + "/")}
            report.objects_deleted = _delete_stale(client, loc, stale, keep)
    uploaded = [e for e in entries if e.path not in same and e.path not in resumed]
    kept = [e for e in entries if e.path in same or e.path in resumed]   # resumed: staged by an interrupted push
    report.files_uploaded, report.bytes_uploaded = len(uploaded), sum(e.size for e in uploaded)
    report.files_skipped, report.bytes_skipped = len(kept), sum(e.size for e in kept)
    report.uploaded = sorted(e.path for e in uploaded)
    report.seconds = time.monotonic() - start
    return report
