"""The runtime a repository carries: the `backends` package (the code its Triton Python models
import), copied into `<repository>/_runtime/<digest[:16]>/backends/` at build time.

A model version is immutable: a repository built by version N and served by a host running N+1
still runs N's pre/post-processing with N's engines and templates. Copies are content-addressed,
so deployments built by the same code share one, and two versions can sit side by side.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import backends
from backends.contract.manifest import RUNTIME_DIR, RuntimeInfo
from builder import __version__

PACKAGE = "backends"


def default_source() -> Path:
    """The installed runtime package (the folder holding backends/__init__.py)."""
    return Path(backends.__file__).resolve().parent


def runtime_files(source: Path) -> dict[str, Path]:
    """{"backends/<relative path>": file} for every Python file of the runtime package."""
    return {f"{PACKAGE}/{p.relative_to(source).as_posix()}": p
            for p in sorted(Path(source).rglob("*.py")) if "__pycache__" not in p.parts}


def runtime_digest(source: Path) -> str:
    h = hashlib.sha256()
    for rel, path in runtime_files(source).items():
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def install_runtime(repository: Path, source: Path | None = None) -> RuntimeInfo:
    """Copy the runtime into the repository unless that exact copy is already there."""
    source = Path(source) if source else default_source()
    digest = runtime_digest(source)
    rel = f"{RUNTIME_DIR}/{digest[:16]}"
    target = Path(repository) / rel
    if not target.is_dir():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for name, path in runtime_files(source).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / name)
        os.replace(tmp, target)
    return RuntimeInfo(digest=digest, path=rel, built_by=f"serverless-triton {__version__}")


def remove_unused_runtimes(repository: Path, used: set[str]) -> None:
    """Delete runtime copies no deployment of the manifest refers to any more."""
    root = Path(repository) / RUNTIME_DIR
    if root.is_dir():
        for d in root.iterdir():
            if f"{RUNTIME_DIR}/{d.name}" not in used:
                shutil.rmtree(d, ignore_errors=True)
