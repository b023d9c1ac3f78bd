"""The build pipeline: deployment specs in, a complete Triton model repository out.

Atomic: everything is written into a staging directory beside the output (unchanged files
hard-linked from the current repository) and swapped in at the end, so a failed or interrupted
build leaves the previous repository as it was and no half-written one. Incremental: a deployment
whose inputs (source checksum, options, every line of build and runtime code, templates) are
unchanged and whose files verify is not rebuilt. Each engine comes from the target the table in
builder/build/targets.py names for its (kind, engine); every repository carries its runtime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import model_repository
from backends.contract.manifest import (
    MANIFEST_NAME,
    DeploymentEntry,
    checksums,
    digest_of,
    read_manifest,
    verify_files,
    write_manifest,
)
from backends.contract.naming import DeploymentName
from backends.errors import InvalidArgumentError
from builder import __version__
from builder.build import runtime
from builder.build.deployment import DeploymentSpec
from builder.build.engine_target import BuildJob
from builder.build.engines import gpu
from builder.build.repository import RepositoryWriter
from builder.build.sources.checkpoint import Checkpoint, resolve, resolve_context_size
from builder.build.targets import target_for
from builder.paths import cache_root
from builder.progress import BuildSteps

GENERATOR = f"serverless-triton {__version__}"
BUILD_CODE = Path(__file__).resolve().parent              # builder/build: sources, engines, writer, pipeline
TEMPLATES = Path(model_repository.__file__).resolve().parent


@dataclass
class BuildOptions:
    output: Path
    cache_dir: Path = field(default_factory=cache_root)
    force: bool = False
    echo: Callable[[str], None] = print
    runtime_source: Path | None = None     # the runtime package to copy in (default: the installed backends/)
    live_progress: bool | None = None      # rich progress display; None: when stderr is a terminal


@dataclass
class BuildResult:
    output: Path
    built: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)


def code_digest(runtime_source: Path | None = None) -> str:
    """Checksum of everything that shapes a built repository: the runtime it carries, the config
    templates, and every module of the build layer (targets, writer, floors come from the runtime's
    contract). A change to any of them rebuilds what it affects."""
    h = hashlib.sha256(__version__.encode())
    h.update(runtime.runtime_digest(runtime_source or runtime.default_source()).encode())
    for root in (TEMPLATES, BUILD_CODE):
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in (".py", ".j2") and "__pycache__" not in p.parts:
                h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def resolve_engine(spec: DeploymentSpec) -> str:
    """`auto` picks TensorRT-LLM only where tensorrt_llm imports and a GPU is present."""
    if spec.engine != "auto":
        return spec.engine
    if importlib.util.find_spec("tensorrt_llm") is not None and gpu.host_gpu() is not None:
        return "tensorrt-llm"
    return "cpu"


def context_size_for(spec: DeploymentSpec, ckpt: Checkpoint) -> int:
    return resolve_context_size(spec.context_size, ckpt.config, ckpt.origin)


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


def remove_unlisted_models(repository: Path, listed: set[str]) -> None:
    """Delete model folders no deployment lists any more, such as the `-pooling` model a rebuilt CPU
    embedding deployment no longer has: serve loads every model folder, and a leftover would hold a
    stub, or fail to load once its runtime copy is gone."""
    for config in Path(repository).glob("*/config.pbtxt"):
        if config.parent.name not in listed:
            shutil.rmtree(config.parent, ignore_errors=True)


def _swap_in(staging: Path, output: Path) -> None:
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.rename(output, old)
    os.rename(staging, output)
    shutil.rmtree(old, ignore_errors=True)


def _inputs_digest(spec: DeploymentSpec, precision: str, ckpt: Checkpoint, engine: str, context: int,
                   code: str) -> str:
    return digest_of({"source": ckpt.digest, "kind": spec.kind, "precision": precision, "engine": engine,
                      "context_size": context, "max_batch_size": spec.max_batch_size, "pooling": spec.pooling,
                      "tp": spec.tensor_parallel, "pp": spec.pipeline_parallel,
                      "max_num_tokens": spec.max_num_tokens, "calibration": spec.calibration_dataset,
                      "int8_kv_cache": spec.int8_kv_cache, "prompt_lookup": spec.prompt_lookup,
                      "memory_test": spec.memory_test, "code": code})


def build(specs: list[DeploymentSpec], opts: BuildOptions) -> BuildResult:
    output = Path(opts.output)
    check_output(output)
    with BuildSteps(opts.echo, opts.live_progress) as steps:
        return _build(specs, opts, output, steps)


def _build(specs: list[DeploymentSpec], opts: BuildOptions, output: Path, steps: BuildSteps) -> BuildResult:
    manifest = read_manifest(output, GENERATOR)
    result = BuildResult(output)
    code = code_digest(opts.runtime_source)
    todo: list[tuple[DeploymentSpec, Checkpoint, str, int, list[tuple[str, str]]]] = []
    for spec in specs:
        ckpt = resolve(spec.source, spec.kind, opts.cache_dir, lambda label, group=spec.name: steps.step(label, group))
        engine = resolve_engine(spec)
        target_for(spec.kind, engine)   # an unknown combination fails before any work
        spec.check_engine_features(engine)
        context = context_size_for(spec, ckpt)
        pending = []
        for precision in spec.precisions:
            dep = DeploymentName(spec.name, precision)
            digest = _inputs_digest(spec, precision, ckpt, engine, context, code)
            entry = manifest.deployments.get(str(dep))
            if not opts.force and entry and entry.inputs_digest == digest and not verify_files(output, entry):
                result.up_to_date.append(str(dep))
            else:
                pending.append((precision, digest))
        if pending:
            todo.append((spec, ckpt, engine, context, pending))
    if not todo:
        return result
    staging = _staging(output)
    try:
        writer = RepositoryWriter(staging, runtime.install_runtime(staging, opts.runtime_source))
        for spec, ckpt, engine, context, pending in todo:
            for precision, digest in pending:
                dep = DeploymentName(spec.name, precision)
                opts.echo(f"{dep}: building the {engine} {'engine' if spec.kind == 'llm' else 'encoder engine'}")
                job = BuildJob(spec, precision, ckpt, context, writer, Path(opts.cache_dir),
                               lambda label, group=str(dep): steps.step(label, group))
                manifest.deployments[str(dep)] = _entry(job, target_for(spec.kind, engine), digest)
                result.built.append(str(dep))
        with steps.step("writing the repository (manifest, then swapped into place)", str(output)):
            shutil.rmtree(staging / ".work", ignore_errors=True)
            runtime.remove_unused_runtimes(staging, set(manifest.runtimes()))
            remove_unlisted_models(staging, manifest.triton_models())
            manifest.generator = GENERATOR
            write_manifest(staging, manifest)
            _swap_in(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _entry(job: BuildJob, target, digest: str) -> DeploymentEntry:
    """Build one deployment and describe it: every file it needs (its models and its runtime) with
    its checksum."""
    built = target.build_deployment(job)
    files: dict[str, str] = {}
    for under in [*built.triton_models, job.writer.runtime.path]:
        files.update(checksums(job.staging, job.staging / under))
    return DeploymentEntry(name=job.spec.name, precision=job.precision, kind=job.spec.kind, source=job.ckpt.origin,
                           triton_models=built.triton_models, entrypoints=built.entrypoints, engine=built.engine,
                           accuracy=built.accuracy, runtime=job.writer.runtime, inputs_digest=digest, files=files)
