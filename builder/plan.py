"""`build-engines --dry-run`: the build plan per deployment and precision, nothing built.

Resolving a GGUF source converts it into the cache (needed to read its config); nothing is
written to the output repository.
"""

from __future__ import annotations

from pathlib import Path

from builder.build import resolve_context_size, resolve_engine
from builder.deployment import DeploymentSpec
from builder.naming import DeploymentName
from builder.precisions import PRECISIONS
from builder.sources.checkpoint import resolve


def _cpu_plan(spec: DeploymentSpec, hf_dir: Path, context: int, cache_dir: Path) -> list[str]:
    task = "text-generation-with-past" if spec.kind == "llm" else "feature-extraction"
    lines = [f"# CPU (OpenVINO) build plan for {spec.name} ({spec.kind}, context {context}, "
             f"max batch {spec.max_batch_size})",
             "# 1. fp32 reference export, cached per checkpoint:",
             f"optimum-cli export openvino --model {hf_dir} --task {task} --weight-format fp32 "
             f"{Path(cache_dir) / 'engines'}/<checkpoint digest>-fp32"]
    for i, precision in enumerate(spec.precisions, 2):
        dep = DeploymentName(spec.name, precision)
        p = PRECISIONS[precision]
        floor = (f"top-1 >= {p.llm_min_top1}, logit cosine >= {p.llm_min_cosine}" if spec.kind == "llm"
                 else f"cosine min >= {p.embedding_min_cosine}, mean >= {p.embedding_mean_cosine}")
        models = dep.llm_models() if spec.kind == "llm" else dep.embedding_models()
        lines += [f"# {i}. {dep}: {p.openvino}; accuracy against fp32 ({floor}); "
                  f"Triton models {', '.join(models)}"]
    return lines


def format_plan(specs: list[DeploymentSpec], output: Path, cache_dir: Path) -> str:
    out = []
    for spec in specs:
        engine = resolve_engine(spec)
        ckpt = resolve(spec.source, spec.kind, cache_dir)
        context = resolve_context_size(spec, ckpt)
        if engine == "tensorrt-llm":
            from builder.engines import tensorrt_llm

            out.append(tensorrt_llm.format_plan(spec, ckpt.hf_dir, Path(output)).rstrip("\n"))
        else:
            out.append("\n".join(_cpu_plan(spec, ckpt.hf_dir, context, cache_dir)))
    out.append(f"# repository: {output} (written atomically; manifest.json last)")
    return "\n\n".join(out) + "\n"
