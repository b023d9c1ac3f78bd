"""The repository manifest (`manifest.json` at the repository root): what was built, how, and
the checksum of every file, so a server (or a pull from object storage) can verify before it loads.

Schema (version 1):
{
  "schema_version": 1,
  "generator": "serverless-triton 0.1.0",
  "deployments": {
    "<name>:<precision>": {
      "name", "precision", "kind": "llm" | "embedding",
      "triton_models": [...],               # Triton model names of this deployment
      "entrypoint": "...",                  # the Triton model clients call
      "engine": {"target", "format", "version", "quantization", "context_size",
                 "max_batch_size", ...target-specific keys (e.g. gpu_arch)},
      "accuracy": {"reference": "fp32", ...figures, "floor": {...}},
      "inputs_digest": "sha256 of source + build options",   # unchanged -> no rebuild
      "files": {"<path relative to repository>": "<sha256>", ...}
    }
  }
}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from builder import __version__
from builder.errors import SourceError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checksums(root: Path, under: Path) -> dict[str, str]:
    """sha256 of every file below `under`, keyed by POSIX path relative to `root`."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(under.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def empty_manifest() -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "generator": f"serverless-triton {__version__}", "deployments": {}}


def read_manifest(repository: Path) -> dict[str, Any]:
    """The repository's manifest, or an empty one if the repository has none yet."""
    path = Path(repository) / MANIFEST_NAME
    if not path.exists():
        return empty_manifest()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} is not a readable manifest ({e}): delete it and rebuild the repository") from None
    if data.get("schema_version") != SCHEMA_VERSION:
        raise SourceError(
            f"{path} has schema version {data.get('schema_version')!r}, this tool reads {SCHEMA_VERSION}: "
            "rebuild the repository with this version of build-engines"
        )
    return data


def write_manifest(repository: Path, manifest: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old manifest or the new one, never half of one."""
    path = Path(repository) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def verify_files(repository: Path, entry: dict[str, Any]) -> list[str]:
    """Paths of a deployment entry whose file is missing or whose checksum differs."""
    bad = []
    for rel, digest in entry.get("files", {}).items():
        p = Path(repository) / rel
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(rel)
    return bad


def digest_of(obj: Any) -> str:
    """Stable sha256 of a JSON-able value (build options, source checksums)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
