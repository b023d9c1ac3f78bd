"""The build pipeline: deployment specs in, a complete Triton model repository out.

Atomic: everything is written into a staging directory beside the output (unchanged files
hard-linked from the current repository) and swapped in at the end, so a failed or interrupted
build leaves the previous repository as it was and no half-written one. Incremental: a deployment
whose inputs (source checksum, options, code) are unchanged and whose files verify is not rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder import __version__
from builder.deployment import DeploymentSpec
from builder.errors import InvalidArgumentError
from builder.manifest import MANIFEST_NAME, checksums, digest_of, read_manifest, verify_files, write_manifest
from builder.naming import DeploymentName
from builder.sources.checkpoint import Checkpoint, max_positions, resolve

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BuildOptions:
    output: Path
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "serverless-triton")
    force: bool = False
    echo: Callable[[str], None] = print


@dataclass
class BuildResult:
    output: Path
    built: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)


def code_digest() -> str:
    """Checksum of the code that ends up in a repository: a change rebuilds what it affects."""
    h = hashlib.sha256(__version__.encode())
    for d in ("backends", "model_repository", "builder/engines"):
        for p in sorted((PROJECT_ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in (".py", ".j2"):
                h.update(p.read_bytes())
    return h.hexdigest()


def resolve_engine(spec: DeploymentSpec) -> str:
    """`auto` picks TensorRT-LLM only where tensorrt_llm imports and a GPU is present."""
    if spec.engine != "auto":
        return spec.engine
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is not None:
        from builder.engines import gpu

        if gpu.host_gpu() is not None:
            return "tensorrt-llm"
    return "cpu"


def resolve_context_size(spec: DeploymentSpec, ckpt: Checkpoint) -> int:
    limit = max_positions(ckpt.config)
    if spec.context_size is None:
        if limit is None:
            raise InvalidArgumentError(f"{ckpt.origin} does not state its position limit: pass --context-size")
        return limit
    if limit is not None and spec.context_size > limit:
        raise InvalidArgumentError(
            f"context size {spec.context_size} exceeds the model's position limit of {limit}: "
            f"use --context-size {limit} or less")
    return spec.context_size


def check_output(output: Path) -> None:
    """Refuse an output we would damage or cannot write, before any work is done."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InvalidArgumentError(f"output {output} is a file: choose a directory with --output")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST_NAME).exists():
        raise InvalidArgumentError(
            f"output {output} is not empty and holds no repository written by build-engines: "
            "choose a new or empty directory with --output")
    parent = output.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidArgumentError(f"cannot write to {output}: {parent} is a file; choose another --output")
    try:  # a real probe: permission bits say nothing for root, or on read-only mounts
        probe = tempfile.NamedTemporaryFile(dir=output if output.is_dir() else parent, prefix=".write-probe")
        probe.close()
    except OSError as e:
        raise InvalidArgumentError(f"cannot write to {output} ({e.strerror}): choose another --output "
                                   "or fix its permissions") from None


def _staging(output: Path) -> Path:
    """A copy of the current repository made of hard links (cheap, and safe: writers replace
    files and folders, they never modify one in place)."""
    staging = output.with_name(f".{output.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    if output.is_dir():
        shutil.copytree(output, staging, copy_function=os.link, symlinks=True)
    else:
        staging.mkdir(parents=True)
    return staging


def _swap_in(staging: Path, output: Path) -> None:
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.rename(output, old)
    os.rename(staging, output)
    shutil.rmtree(old, ignore_errors=True)


class _Step:
    """Prints `label ...` and `label done (N s)` around a long step."""

    def __init__(self, echo: Callable[[str], None], label: str):
        self.echo, self.label = echo, label

    def __enter__(self):
        self.t0 = time.monotonic()
        self.echo(f"  {self.label} ...")

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.echo(f"  {self.label} done ({time.monotonic() - self.t0:.1f} s)")


def _inputs_digest(spec: DeploymentSpec, precision: str, ckpt: Checkpoint, engine: str, context: int) -> str:
    return digest_of({"source": ckpt.digest, "kind": spec.kind, "precision": precision, "engine": engine,
                      "context_size": context, "max_batch_size": spec.max_batch_size, "pooling": spec.pooling,
                      "tp": spec.tensor_parallel, "pp": spec.pipeline_parallel, "code": code_digest()})


def build(specs: list[DeploymentSpec], opts: BuildOptions) -> BuildResult:
    output = Path(opts.output)
    check_output(output)
    manifest = read_manifest(output)
    result = BuildResult(output)
    todo: list[tuple[DeploymentSpec, Checkpoint, str, int, list[tuple[str, str]]]] = []
    for spec in specs:
        ckpt = resolve(spec.source, spec.kind, opts.cache_dir)
        engine = resolve_engine(spec)
        context = resolve_context_size(spec, ckpt)
        pending = []
        for precision in spec.precisions:
            dep = DeploymentName(spec.name, precision)
            digest = _inputs_digest(spec, precision, ckpt, engine, context)
            entry = manifest["deployments"].get(str(dep))
            if (not opts.force and entry and entry.get("inputs_digest") == digest
                    and not verify_files(output, entry)):
                result.up_to_date.append(str(dep))
            else:
                pending.append((precision, digest))
        if pending:
            todo.append((spec, ckpt, engine, context, pending))
    if not todo:
        return result
    staging = _staging(output)
    try:
        for spec, ckpt, engine, context, pending in todo:
            _build_spec(spec, ckpt, engine, context, pending, staging, manifest, opts)
            result.built += [str(DeploymentName(spec.name, p)) for p, _ in pending]
        shutil.rmtree(staging / ".work", ignore_errors=True)
        write_manifest(staging, manifest)
        _swap_in(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _build_spec(spec, ckpt, engine, context, pending, staging, manifest, opts) -> None:
    if spec.kind == "embedding":
        from builder.engines import openvino_encoder, tensorrt_encoder

        def step(label: str) -> _Step:
            return _Step(opts.echo, label)

        for precision, digest in pending:
            dep = DeploymentName(spec.name, precision)
            opts.echo(f"{dep}: building the {engine} encoder engine")
            if engine == "cpu":
                entry = openvino_encoder.build_deployment(spec, precision, ckpt, context, staging, opts.cache_dir,
                                                          step)
            else:
                entry = tensorrt_encoder.build_deployment(spec, precision, ckpt, context, staging, step)
            _finish_entry(entry, dep, spec, ckpt, digest, staging)
            manifest["deployments"][str(dep)] = entry
        return
    from builder import llm_build

    for precision, digest in pending:
        dep = DeploymentName(spec.name, precision)
        opts.echo(f"{dep}: building the {engine} engine")
        entry = llm_build.build_deployment(spec, precision, ckpt, engine, context, staging, opts.cache_dir,
                                           lambda label: _Step(opts.echo, label))
        _finish_entry(entry, dep, spec, ckpt, digest, staging)
        manifest["deployments"][str(dep)] = entry


def _finish_entry(entry: dict, dep: DeploymentName, spec: DeploymentSpec, ckpt: Checkpoint, digest: str,
                  staging: Path) -> None:
    entry.update({"name": dep.name, "precision": dep.precision, "kind": spec.kind, "source": ckpt.origin,
                  "inputs_digest": digest})
    files: dict[str, str] = {}
    for model in entry["triton_models"]:
        files.update(checksums(staging, staging / model))
    entry["files"] = files
