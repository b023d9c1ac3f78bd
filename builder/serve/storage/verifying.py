"""`repo verify DIR`: re-hash every file of a local repository against what it should hold.

Pull trusts a file whose stat is unchanged since it wrote it; verify trusts nothing, so it is the
check to run after a disk error, a restore from backup, or on a suspicion. Reference: the
`repository-index.json` a pull left in DIR, else (a repository built here, never pulled) the file
checksums in `manifest.json`. Read-only: repairing is the next `repo pull`'s job.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from backends.contract.manifest import MANIFEST_NAME, read_manifest, sha256_file
from backends.errors import InvalidArgumentError, StorageError
from builder.serve.storage.index import INDEX_NAME, RepositoryIndex, walk_repository


@dataclass
class VerifyReport:
    directory: str
    reference: str                                      # the file the digests came from
    files_checked: int = 0
    changed: list[str] = field(default_factory=list)    # content differs from the reference's sha256
    missing: list[str] = field(default_factory=list)    # listed, but not a file here
    extra: list[str] = field(default_factory=list)      # here, but not listed (index reference only)
    missing_dirs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra or self.missing_dirs)

    def lines(self) -> list[str]:
        """One line per difference, `<kind>  <path>`, in path order."""
        found = [(p, "changed") for p in self.changed] + [(p, "missing") for p in self.missing]
        found += [(p, "extra") for p in self.extra] + [(p + "/", "missing") for p in self.missing_dirs]
        return [f"{kind:<8} {path}" for path, kind in sorted(found)]

    def summary(self) -> str:
        if self.ok:
            return f"{self.directory}: all {self.files_checked} files match {self.reference}"
        n = len(self.changed) + len(self.missing) + len(self.extra) + len(self.missing_dirs)
        return (f"{self.directory}: {n} of {self.files_checked} entries differ from {self.reference}: "
                "`serverless-triton repo pull URL DIR` downloads them again (or rebuild the repository)")


def _reference(root: Path) -> tuple[str, dict[str, str], list[str] | None, RepositoryIndex | None]:
    """(name, {path: sha256}, empty dirs or None, index or None) of what `root` should hold."""
    index_path = root / INDEX_NAME
    if index_path.exists():
        try:
            index = RepositoryIndex.from_json(index_path.read_bytes(), source=str(index_path))
        except OSError as e:
            raise StorageError(f"cannot read {index_path} ({e.strerror}): pull the repository again") from None
        return INDEX_NAME, {p: e.sha256 for p, e in index.files.items()}, index.dirs, index
    if (root / MANIFEST_NAME).exists():
        manifest = read_manifest(root)
        files = {rel: digest for entry in manifest.deployments.values() for rel, digest in entry.files.items()}
        return MANIFEST_NAME, files, None, None
    raise InvalidArgumentError(f"{root} has neither {INDEX_NAME} (written by `repo pull`) nor {MANIFEST_NAME} "
                               "(written by build-engines): nothing to verify against")


def verify(directory: Path, *, workers: int = 4) -> VerifyReport:
    """Hash every listed file (no stat shortcut) and list each one that differs."""
    root = Path(directory)
    if not root.is_dir():
        raise InvalidArgumentError(f"{root} is not a directory: pass a model repository")
    name, expected, dirs, index = _reference(root)
    report = VerifyReport(str(root), name, files_checked=len(expected))

    def check(item: tuple[str, str]) -> tuple[str, str | None]:
        rel, digest = item
        path = root / rel
        if path.is_symlink() or not path.is_file():
            return rel, "missing"
        try:
            return rel, None if sha256_file(path) == digest else "changed"
        except OSError:
            return rel, "missing"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rel, problem in pool.map(check, sorted(expected.items())):
            if problem:
                getattr(report, problem).append(rel)
    if index is not None:
        present, _ = walk_repository(root)
        report.extra = sorted(set(present) - set(expected))
        report.missing_dirs = sorted(d for d in dirs or [] if not os.path.isdir(root / d))
    return report
