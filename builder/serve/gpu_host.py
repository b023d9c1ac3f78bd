"""Serving host checks for GPU engines: TensorRT-LLM engines and TensorRT plans only run on the GPU
architecture and TensorRT build they were built for, and parallel engines need their GPU count
(and an MPI job of one tritonserver per rank)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from backends.contract.manifest import Manifest
from backends.contract.naming import DeploymentName
from backends.errors import ServeError
from builder.build.engines.gpu import host_gpu, same_tensorrt, tensorrt_version
from builder.build.engines.tensorrt_encoder import TARGET as TENSORRT_ENCODER
from builder.build.engines.tensorrt_llm import TARGET

# Parameters the tensorrtllm backend opens as given: the engine and the xgrammar tokenizer info.
_PATH_PARAMETERS = re.compile(
    r'(key:\s*"(?:gpt_model_path|xgrammar_tokenizer_info_path)"\s*value:\s*\{\s*string_value:\s*")([^"]*)(")', re.S)


def localize_engine_paths(repository: Path) -> list[str]:
    """Rewrite relative gpt_model_path and xgrammar_tokenizer_info_path values to absolute paths
    under `repository`.

    The tensorrtllm backend opens both as given (std::filesystem::exists on the raw string), i.e.
    relative to tritonserver's working directory. Started with the repository root as its working
    directory, tritonserver resolves the relative paths as rendered; call this only to run
    tritonserver from elsewhere. It edits the configs, so run it on a serving copy after the
    manifest checksums were verified.
    """
    repository = Path(repository).resolve()
    changed = []
    for cfg in sorted(repository.glob("*/config.pbtxt")):
        text = cfg.read_text()

        def absolute(m: re.Match) -> str:
            return m[0] if Path(m[2]).is_absolute() else m[1] + str(repository / m[2]) + m[3]

        new = _PATH_PARAMETERS.sub(absolute, text)
        if new != text:
            cfg.write_text(new)
            changed.append(cfg.parent.name)
    return changed


_DETECT = object()
GPU_TARGETS = (TARGET, TENSORRT_ENCODER)   # TensorRT-LLM engines and TensorRT encoder plans


def gpu_engine_entries(manifest: Manifest) -> list[tuple[str, dict]]:
    return [(name, entry.engine) for name, entry in sorted(manifest.deployments.items())
            if entry.engine.get("target") in GPU_TARGETS]


def mpi_world(manifest: Manifest) -> tuple[int, list[str]]:
    """(MPI world size, the engine models every rank loads) for serving this repository.

    A tensor x pipeline parallel TensorRT-LLM engine runs one MPI rank per GPU: tritonserver is
    started under mpirun, one process per rank (tensorrtllm_backend's launch_triton_server.py), and
    ranks above 0 load only the engine models. One world size per repository: the ranks are one
    MPI job.
    """
    sizes: dict[int, list[str]] = {}
    for name, engine in gpu_engine_entries(manifest):
        if engine.get("target") == TARGET:
            base, precision = name.rsplit(":", 1)
            sizes.setdefault(int(engine.get("world_size", 1)), []).append(DeploymentName(base, precision).llm_engine)
    parallel = {w: models for w, models in sizes.items() if w > 1}
    if not parallel:
        return 1, []
    if len(sizes) > 1:
        listing = "; ".join(f"world size {w}: {', '.join(m)}" for w, m in sorted(sizes.items()))
        raise ServeError(f"this repository mixes TensorRT-LLM engines of different GPU counts ({listing}): one "
                         "serve runs one MPI job, so serve them from separate repositories")
    (world, models), = parallel.items()
    return world, sorted(models)


def check_serving_host(manifest: Manifest, *, gpu: Any = _DETECT, trt: Any = _DETECT) -> None:
    """Refuse to serve GPU engines this host cannot load: no GPU, another compute capability,
    another TensorRT build, or too few GPUs for the engine's tensor x pipeline parallel size."""
    engines = gpu_engine_entries(manifest)
    if not engines:
        return
    host = host_gpu() if gpu is _DETECT else gpu
    host_trt = tensorrt_version() if trt is _DETECT else trt
    for name, engine in engines:
        built = engine.get("gpu_arch", {})
        built_gpu = f"{built.get('name', 'a GPU')} (compute capability {built.get('compute_capability', '?')})"
        if host is None:
            raise ServeError(f"{name} is a {engine['target']} engine built for {built_gpu}, but this host has "
                             "no GPU: serve it on a GPU host, or rebuild it with --engine cpu")
        if built.get("compute_capability") != host.cc:
            raise ServeError(f"{name} was built for {built_gpu}; this host has {host.describe()}: rebuild it "
                             "here with build-engines --engine tensorrt-llm (engines only run on the GPU "
                             "architecture they were built for)")
        want = engine.get("tensorrt_version")
        if not want:
            raise ServeError(f"{name}'s manifest entry records no TensorRT version: rebuild it with this "
                             "version of build-engines")
        if host_trt is None:
            raise ServeError(f"cannot tell this host's TensorRT version, and {name} needs TensorRT {want}: "
                             "serve from the docker/Dockerfile.gpu image, or set TRT_VERSION")
        if not same_tensorrt(want, host_trt):
            raise ServeError(f"{name} was built with TensorRT {want}; this host has TensorRT {host_trt}: "
                             "rebuild it here, or serve from the image it was built in (docker/Dockerfile.gpu)")
        world = int(engine.get("world_size", 1))
        if world > host.count:
            raise ServeError(f"{name} is split over {world} GPUs (tensor x pipeline parallel) but this host "
                             f"has {host.count}: serve it on a host with {world} GPUs, or rebuild with fewer")
