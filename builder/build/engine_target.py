"""The contract every engine target implements (OpenVINO LLM and encoder on CPU, TensorRT-LLM and
TensorRT encoder on GPU): build one precision of one deployment from a checkpoint into the staging
repository, through the one repository writer, and say what was built; print the plan of a build.

The build pipeline picks a target from the table in builder/build/targets.py, keyed by
(kind, engine); it never asks which target it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from backends.contract.naming import DeploymentName
from builder.build.deployment import DeploymentSpec
from builder.build.repository import RepositoryWriter
from builder.build.sources.checkpoint import Checkpoint

Step = Callable[[str], AbstractContextManager]   # step("label"): reports a long step (builder/progress.py)


@dataclass(frozen=True)
class BuildJob:
    """One `<name>:<precision>` to build: the spec, its resolved checkpoint and context size, and
    where to write (the staging repository's writer)."""

    spec: DeploymentSpec
    precision: str
    ckpt: Checkpoint
    context_size: int
    writer: RepositoryWriter
    cache_dir: Path
    step: Step

    @property
    def dep(self) -> DeploymentName:
        return DeploymentName(self.spec.name, self.precision)

    @property
    def staging(self) -> Path:
        return self.writer.root


@dataclass(frozen=True)
class BuiltDeployment:
    """What a target built: the pipeline completes the manifest entry (files, runtime, digest)."""

    triton_models: list[str]
    entrypoints: dict[str, str]       # infer (and stream): the Triton models clients call
    engine: dict[str, Any]            # target, format, version, quantization, context_size, max_batch_size, ...
    accuracy: dict[str, Any]          # figures against the fp32 reference and the floor they met


class EngineTarget(Protocol):
    """Implemented by each module of builder/build/engines that builds deployments."""

    def build_deployment(self, job: BuildJob) -> BuiltDeployment: ...

    def format_plan(self, spec: DeploymentSpec, ckpt: Checkpoint, context_size: int, output: Path,
                    cache_dir: Path) -> str: ...

