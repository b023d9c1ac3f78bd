"""`build-engines --dry-run`: the build plan per deployment and precision, nothing built.

Each deployment's engine target prints its own plan. Resolving a GGUF source converts it into the
cache (needed to read its config); nothing is written to the output repository.
"""

from __future__ import annotations

from pathlib import Path

from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import context_size_for, resolve_engine
from builder.build.sources.checkpoint import resolve
from builder.build.targets import target_for


def format_plan(specs: list[DeploymentSpec], output: Path, cache_dir: Path) -> str:
    out = []
    for spec in specs:
        ckpt = resolve(spec.source, spec.kind, cache_dir)
        target = target_for(spec.kind, resolve_engine(spec))
        out.append(target.format_plan(spec, ckpt, context_size_for(spec, ckpt), Path(output), Path(cache_dir)))
    out.append(f"# repository: {output} (written atomically; manifest.json last)")
    return "\n\n".join(out) + "\n"
