"""Pure unit tests of builder.serve.storage: key safety, index parsing, model diffs, the atomic swap.

No object store here; tests/test_storage.py covers the real transfers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest

from backends.errors import InvalidArgumentError, StorageError
from builder.serve import storage
from builder.serve.storage import INDEX_NAME, FileEntry, RepositoryIndex

SHA = "a" * 64


@pytest.mark.parametrize("path", [
    "model/1/model.py", "manifest.json", "a/b/c/d.bin", "name with spaces/x", "ünïcode/ok.txt", "..hidden/x",
    "x..y/z", ".dotfile",
])
def test_plain_relative_paths_are_accepted(path):
    assert storage.safe_relpath(path) == path


@pytest.mark.parametrize("path", [
    "../escape", "model/../../escape", "model/..", "..", "/etc/passwd", "//server/share", "C:/windows",
    "c:relative", "model\\..\\escape", "a//b", "a/./b", "./a", "a/", "", "a\x00b", "line\nbreak", None, 42,
])
def test_unsafe_paths_are_refused(path):
    with pytest.raises(StorageError, match="refusing path"):
        storage.safe_relpath(path)


def test_target_path_refuses_a_symlink_that_leads_out(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert storage.target_path(root, "model/x") == root / "model" / "x"
    with pytest.raises(StorageError, match="leads outside"):
        storage.target_path(root, "link/x")


@pytest.mark.parametrize("files, dirs, problem", [
    (["a", "a/b"], [], "both as a file and as a directory"),
    (["a/b", "a/b/c"], [], "both as a file and as a directory"),
    (["a/b"], ["a/b"], "both as a file and as a directory"),
    (["a/b"], ["a/b/c"], "both as a file and as a directory"),
    (["x", "x"], [], "twice"),
    ([INDEX_NAME], [], "its own name"),
    (["ok"], ["../up"], "refusing path"),
])
def test_layout_conflicts_are_refused(files, dirs, problem):
    with pytest.raises(StorageError, match=problem):
        storage.check_layout(files, dirs)


def test_layout_with_nested_files_and_empty_dirs_is_fine():
    storage.check_layout(["m/1/model.py", "m/config.pbtxt", "manifest.json"], ["ens/1", "m/2"])


@pytest.mark.parametrize("url, bucket, prefix", [
    ("s3://models/prod", "models", "prod"),
    ("s3://models/prod/", "models", "prod"),
    ("s3://models/a/b/c", "models", "a/b/c"),
    ("s3://models", "models", ""),
    ("s3://models/", "models", ""),
])
def test_urls_parse(url, bucket, prefix):
    loc = storage.parse_url(url)
    assert (loc.bucket, loc.prefix) == (bucket, prefix)
    assert loc.index_key == (f"{prefix}/{INDEX_NAME}" if prefix else INDEX_NAME)
    assert loc.list_prefix == (f"{prefix}/" if prefix else "")


@pytest.mark.parametrize("url", ["models/prod", "http://x/y", "s3://", "s3://A_B/x", "s3://models/../x",
                                 "s3://models/a//b"])
def test_bad_urls_are_refused(url):
    with pytest.raises(InvalidArgumentError):
        storage.parse_url(url)


def _index(files, dirs=(), **extra) -> bytes:
    doc = {"schema_version": 1, "files": files, "dirs": list(dirs), **extra}
    return json.dumps(doc).encode()


def test_index_round_trips():
    index = RepositoryIndex({"m/1/x": FileEntry("m/1/x", 3, SHA, '"etag"'), "top": FileEntry("top", 0, SHA)},
                            ["ens/1"])
    again = RepositoryIndex.from_json(index.to_json(), source="t")
    assert again.files == index.files and again.dirs == ["ens/1"]
    assert again.content() == index.content()


@pytest.mark.parametrize("path", ["../evil.txt", "/etc/cron.d/evil", "m/../../evil", "m\\..\\evil"])
def test_index_with_a_traversal_path_is_refused(path):
    with pytest.raises(StorageError, match="refusing path"):
        RepositoryIndex.from_json(_index([{"path": path, "size": 1, "sha256": SHA}]), source="the index")


def test_index_with_a_traversal_dir_is_refused():
    with pytest.raises(StorageError, match="refusing path"):
        RepositoryIndex.from_json(_index([], dirs=["../../tmp/x"]), source="the index")


@pytest.mark.parametrize("entry", [
    {"path": "a", "size": -1, "sha256": SHA},
    {"path": "a", "size": "1", "sha256": SHA},
    {"path": "a", "size": 1, "sha256": "nothex"},
    {"path": "a", "size": 1},
    "a",
])
def test_malformed_index_entries_are_refused(entry):
    with pytest.raises(StorageError, match="malformed"):
        RepositoryIndex.from_json(_index([entry]), source="the index")


def test_a_staged_entry_names_its_own_blob_and_nothing_else():
    staged = RepositoryIndex.from_json(_index([{"path": "m/1/x", "size": 1, "sha256": SHA,
                                                "key": f".blobs/{SHA}"}]), source="t")
    assert staged.files["m/1/x"].object == f".blobs/{SHA}"
    assert RepositoryIndex.from_json(staged.to_json(), source="t").files == staged.files
    for key in ("../../elsewhere", f".blobs/{'b' * 64}", "m/1/x"):
        with pytest.raises(StorageError, match="is not its blob"):
            RepositoryIndex.from_json(_index([{"path": "m/1/x", "size": 1, "sha256": SHA, "key": key}]), source="t")


def test_the_blob_folder_is_reserved():
    with pytest.raises(StorageError, match="'.blobs' at the top is where pushes stage new content"):
        RepositoryIndex.from_json(_index([{"path": ".blobs/x", "size": 1, "sha256": SHA}]), source="t")


@pytest.mark.parametrize("data, problem", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"schema_version": 99, "files": []}).encode(), "schema version 99"),
    (json.dumps([1, 2]).encode(), "schema version None"),
    (json.dumps({"schema_version": 1, "files": {}}).encode(), "malformed"),
])
def test_unreadable_indexes_are_refused(data, problem):
    with pytest.raises(StorageError, match=problem):
        RepositoryIndex.from_json(data, source="the index")


def _idx(files: dict[str, str], dirs=()) -> RepositoryIndex:
    return RepositoryIndex({p: FileEntry(p, 1, d * 64) for p, d in files.items()}, list(dirs))


def test_model_changes_compare_top_level_directories():
    old = _idx({"a/1/m.py": "1", "b/1/m.py": "2", "gone/x": "3", "manifest.json": "4"}, ["ens/1"])
    new = _idx({"a/1/m.py": "1", "b/1/m.py": "9", "new/x": "5", "manifest.json": "6"}, ["ens/1"])
    added, changed, removed = storage.model_changes(old, new)
    assert (added, changed, removed) == (["new"], ["b"], ["gone"])  # manifest.json is no model


def test_model_changes_count_an_added_empty_version_dir():
    old = _idx({"ens/config.pbtxt": "1"}, [])
    new = _idx({"ens/config.pbtxt": "1"}, ["ens/1"])
    assert storage.model_changes(old, new) == ([], ["ens"], [])


def test_without_an_old_index_every_model_counts_as_changed():
    assert storage.model_changes(None, _idx({"a/x": "1", "b/y": "2"})) == ([], ["a", "b"], [])


def test_scan_leaves_out_caches_and_our_own_index(tmp_path):
    (tmp_path / "m" / "1" / "__pycache__").mkdir(parents=True)
    (tmp_path / "m" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    (tmp_path / "m" / "1" / "model.py").write_text("print()")
    (tmp_path / "m" / "1" / "stray.pyc").write_bytes(b"x")
    (tmp_path / "ens" / "1").mkdir(parents=True)
    (tmp_path / INDEX_NAME).write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / INDEX_NAME).write_text("kept: only the root one is ours")
    index = storage.scan_local(tmp_path)
    assert sorted(index.files) == ["m/1/model.py", f"sub/{INDEX_NAME}"]
    assert index.dirs == ["ens/1"]


def _two_dirs(tmp_path):
    """Directories a and b holding a file f with "A" and "B"."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d, text in ((a, "A"), (b, "B")):
        d.mkdir()
        (d / "f").write_text(text)
    return a, b


def test_exchange_swaps_two_directories_with_one_renameat2(tmp_path):
    """On Linux (this test's platform) the kernel call itself succeeds, and exchange says it used it."""
    a, b = _two_dirs(tmp_path)
    ino_a, ino_b = a.stat().st_ino, b.stat().st_ino
    assert storage.pulling._renameat2_exchange(a, b) == 0           # the syscall, not a fallback
    assert a.stat().st_ino == ino_b and b.stat().st_ino == ino_a
    assert storage.exchange(a, b) == storage.SWAP_EXCHANGE
    assert (a / "f").read_text() == "A" and (b / "f").read_text() == "B"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_renameat2_errors_are_reported_not_hidden(tmp_path):
    a, _ = _two_dirs(tmp_path)
    assert storage.pulling._renameat2_exchange(a, tmp_path / "missing") == errno.ENOENT
    with pytest.raises(FileNotFoundError):
        storage.exchange(a, tmp_path / "missing")


def test_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    class NoRenameat2:
        def __init__(self, *a, **k):
            raise OSError("no libc here")

    monkeypatch.setattr(storage.pulling.ctypes, "CDLL", NoRenameat2)
    a, b = _two_dirs(tmp_path)
    assert storage.exchange(a, b) == storage.SWAP_RENAMES
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_store_errors_never_show_the_secret():
    from botocore.exceptions import ClientError

    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    err = ClientError({"Error": {"Code": "SignatureDoesNotMatch", "Message": f"bad signature for {secret}"}},
                      "GetObject")
    e = storage.storage_error(err, doing="pulling from", location=storage.parse_url("s3://models/p"),
                              endpoint="http://127.0.0.1:9")
    assert "refused the credentials" in str(e) and secret not in str(e)


def test_s3transfer_wrapped_errors_are_unwrapped():
    from botocore.exceptions import ClientError
    from s3transfer.exceptions import S3UploadFailedError

    try:
        try:
            raise ClientError({"Error": {"Code": "NoSuchBucket", "Message": "x"}}, "PutObject")
        except ClientError as inner:
            raise S3UploadFailedError(f"Failed to upload: {inner}") from inner
    except S3UploadFailedError as outer:
        e = storage.storage_error(outer, doing="pushing to", location=storage.parse_url("s3://nope-bucket/p"),
                                  endpoint="http://127.0.0.1:9")
    assert "bucket 'nope-bucket' does not exist" in str(e)


def test_cache_dir_differs_per_location_and_endpoint():
    a = storage.default_cache_dir("s3://models/prod", "http://127.0.0.1:1")
    b = storage.default_cache_dir("s3://models/prod", "http://127.0.0.1:2")
    c = storage.default_cache_dir("s3://models/dev", "http://127.0.0.1:1")
    assert len({a, b, c}) == 3 and a.name.startswith("models-prod-")


def test_push_delete_at_a_bucket_root_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="would delete every other object"):
        storage.push(tmp_path, "s3://models", delete=True, quiet=True)


def test_push_of_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="is not a directory"):
        storage.push(tmp_path / "nope", "s3://models/p", quiet=True)


def test_hash_cache_reads_unchanged_files_once_and_notices_changes(tmp_path, monkeypatch):
    calls = []
    real = storage.index.sha256_file
    monkeypatch.setattr(storage.index, "sha256_file", lambda p: calls.append(p) or real(p))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 1000)
    cache = storage.HashCache(tmp_path / "cache.json")
    first = cache.sha256(f)
    cache.save()
    again = storage.HashCache(tmp_path / "cache.json")  # a later push, a new process
    assert again.sha256(f) == first and len(calls) == 1
    f.write_bytes(b"b" * 1000)  # same size, new content: ctime and mtime move
    assert again.sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest() and len(calls) == 2
    (tmp_path / "cache.json").write_text("not json")
    assert storage.HashCache(tmp_path / "cache.json").sha256(f) == again.sha256(f)  # a broken cache costs a re-read
