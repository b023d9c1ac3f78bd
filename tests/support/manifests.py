"""Manifests for tests that need one without building engines."""

from __future__ import annotations

from pathlib import Path

from backends.contract.manifest import DeploymentEntry, Manifest, RuntimeInfo, write_manifest

RUNTIME = RuntimeInfo("0" * 64, "_runtime/0000000000000000", "serverless-triton test")


def entry(user_name: str, kind: str = "llm", engine: dict | None = None, **entrypoints: str) -> DeploymentEntry:
    """A deployment entry with the Triton models `build-engines` would write for it."""
    name, precision = user_name.split(":")
    base = f"{name}-{precision}"
    if kind == "llm":
        models = [f"{name}-preprocessing", f"{name}-postprocessing", f"{base}-engine", f"{base}-engine-call", base,
                  f"{base}-stream"]
        points = {"infer": base, "stream": f"{base}-stream"}
    else:
        models = [f"{name}-tokenize", f"{base}-encoder", base]     # the CPU layout: the encoder pools
        points = {"infer": base}
    points.update(entrypoints)
    return DeploymentEntry(name, precision, kind, "test", models, points, engine or {}, {}, RUNTIME)


def write(repository: Path, *entries: DeploymentEntry) -> None:
    Path(repository).mkdir(parents=True, exist_ok=True)
    write_manifest(repository, Manifest("serverless-triton test", {e.user_name: e for e in entries}))
