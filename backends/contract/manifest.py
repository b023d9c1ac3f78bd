"""The repository manifest (`manifest.json` at the repository root), typed: what was built, how, with
which runtime, and the checksum of every file, so a server (or a pull from object storage) can
verify before it loads.

Schema 2 (JSON, keys as the dataclass fields below):
  {"schema_version": 2, "generator": "serverless-triton X.Y.Z",
   "deployments": {"<name>:<precision>": DeploymentEntry}}
A schema-1 manifest (written before repositories carried their runtime) cannot be upgraded: its
models import whatever the serving host has installed. It is refused with the fix (rebuild).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from backends.errors import SourceError

MANIFEST_NAME = "manifest.json"
RUNTIME_DIR = "_runtime"      # <repository>/_runtime/<digest[:16]>/backends: not a Triton model
SCHEMA_VERSION = 2
KINDS = ("llm", "embedding")
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
        for p in sorted(Path(under).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def digest_of(obj: Any) -> str:
    """Stable sha256 of a JSON-able value (build options, source checksums)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class RuntimeInfo:
    """The runtime package (backends/) copied into the repository, which every Python model of a
    deployment imports instead of whatever the serving host has installed."""

    digest: str          # sha256 over the runtime's files (paths and contents)
    path: str            # relative to the repository: _runtime/<digest[:16]>
    built_by: str        # "serverless-triton X.Y.Z"


@dataclass
class DeploymentEntry:
    """One deployment `<name>:<precision>`. `engine` and `accuracy` hold target-specific figures
    (engine: target, format, version, quantization, context_size, max_batch_size, ...)."""

    name: str
    precision: str
    kind: str                                   # llm | embedding
    source: str
    triton_models: list[str]
    entrypoints: dict[str, str]                 # infer (and stream for LLMs): the Triton models clients call
    engine: dict[str, Any]
    accuracy: dict[str, Any]
    runtime: RuntimeInfo
    inputs_digest: str = ""                     # sha256 of source + options + code: unchanged -> no rebuild
    files: dict[str, str] = field(default_factory=dict)   # path relative to the repository -> sha256

    @property
    def user_name(self) -> str:
        return f"{self.name}:{self.precision}"

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "DeploymentEntry":
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"inputs_digest", "files"})
        if missing or data.get("kind") not in KINDS:
            raise SourceError(f"{where} is malformed (missing {', '.join(missing) or 'a valid kind'}): "
                              "rebuild the repository with build-engines")
        values = {k: v for k, v in data.items() if k in names}
        values["runtime"] = RuntimeInfo(**{k: data["runtime"][k] for k in ("digest", "path", "built_by")})
        return cls(**values)


@dataclass
class Manifest:
    generator: str
    deployments: dict[str, DeploymentEntry] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def runtimes(self) -> dict[str, RuntimeInfo]:
        """Every runtime some deployment uses, by path."""
        return {e.runtime.path: e.runtime for e in self.deployments.values()}

    def triton_models(self) -> set[str]:
        """Every Triton model some deployment uses."""
        return {m for e in self.deployments.values() for m in e.triton_models}


def read_manifest(repository: Path, generator: str = "") -> Manifest:
    """The repository's manifest, or an empty one if the repository has none yet."""
    path = Path(repository) / MANIFEST_NAME
    if not path.exists():
        return Manifest(generator)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} is not a readable manifest ({e}): delete it and rebuild the repository") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version == 1:
        raise SourceError(f"{path} was written before repositories carried their runtime code (schema 1): "
                          "rebuild the repository with this build-engines (same command, same -o)")
    if version != SCHEMA_VERSION or not isinstance(data.get("deployments"), dict):
        raise SourceError(f"{path} has schema version {version!r}, this tool reads {SCHEMA_VERSION}: "
                          "rebuild the repository with this version of build-engines")
    deployments = {k: DeploymentEntry.from_dict(v, f"{path}: deployment {k}") for k, v in data["deployments"].items()}
    return Manifest(str(data.get("generator", "")), deployments)


def write_manifest(repository: Path, manifest: Manifest) -> None:
    """Write atomically: a reader sees the old manifest or the new one, never half of one."""
    path = Path(repository) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)


def verify_files(repository: Path, entry: DeploymentEntry, only_under: tuple[str, ...] = ()) -> list[str]:
    """Paths of a deployment entry whose file is missing or whose checksum differs (limited to
    paths starting with one of `only_under`, when given)."""
    bad = []
    for rel, digest in entry.files.items():
        if only_under and not rel.startswith(only_under):
            continue
        p = Path(repository) / rel
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(rel)
    return bad


def check_runtimes(repository: Path, manifest: Manifest) -> None:
    """Refuse a repository whose runtime code (or a model's pointer to it) is missing or altered:
    naming the deployment and the fix. Cheap: only the runtime and model.py files are hashed."""
    for user_name, entry in sorted(manifest.deployments.items()):
        code = tuple(f"{m}/1/model.py" for m in entry.triton_models)
        bad = verify_files(repository, entry, (entry.runtime.path + "/", *code))
        if bad:
            raise SourceError(
                f"model {user_name}: its runtime code in {Path(repository) / entry.runtime.path} is missing or altered "
                f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): pull the repository again, or rebuild it "
                "with build-engines")
