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

Modules: `index` (locations, path safety, the index, local scans), `s3` (client, errors, progress),
`pushing`, `pulling`, `refreshing`, `verifying` (`repo verify`). Callers import from the package.
"""

from builder.serve.storage.index import (
                                   INDEX_NAME,
                                   INDEX_SCHEMA,
                                   FileEntry,
                                   HashCache,
                                   RepositoryIndex,
                                   S3Location,
                                   check_layout,
                                   is_s3_url,
                                   parse_url,
                                   read_local_index,
                                   safe_relpath,
                                   scan_local,
                                   target_path,
)
from builder.serve.storage.pulling import SWAP_EXCHANGE, SWAP_NEW, SWAP_RENAMES, PullReport, exchange, pull
from builder.serve.storage.pushing import PushReport, push
from builder.serve.storage.refreshing import RefreshReport, default_cache_dir, model_changes, refresh
from builder.serve.storage.s3 import TransferSettings, make_client, storage_error
from builder.serve.storage.verifying import VerifyReport, verify

__all__ = ["INDEX_NAME", "INDEX_SCHEMA", "FileEntry", "HashCache", "RepositoryIndex", "S3Location", "check_layout",
           "is_s3_url", "parse_url", "read_local_index", "safe_relpath", "scan_local", "target_path", "PullReport",
           "exchange", "pull", "PushReport", "push", "RefreshReport", "default_cache_dir", "model_changes", "refresh",
           "TransferSettings", "make_client", "storage_error", "SWAP_EXCHANGE", "SWAP_NEW", "SWAP_RENAMES",
           "VerifyReport", "verify"]
