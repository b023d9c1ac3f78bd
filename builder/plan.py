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


def _cpu_plan(spec: DeploymentSpec, ckpt, context: int, cache_dir: Path) -> list[str]:
    if spec.kind == "llm":
        args, ref, limit = "--task text-generation-with-past", "fp32", f"context {context}"
    else:
        from backends.embedding import read_checkpoint_config

        config = read_checkpoint_config(ckpt.hf_dir, ckpt.config, spec.pooling, spec.context_size, ckpt.origin)
        args = "--library transformers --task feature-extraction --disable-convert-tokenizer"
        ref, limit = "encoder-fp32", f"max length {min(config.max_length, context)}, pooling {config.pooling}"
    lines = [f"# CPU (OpenVINO) build plan for {spec.name} ({spec.kind}, {limit}, max batch {spec.max_batch_size})",
             "# 1. fp32 reference export, cached per checkpoint:",
             f"optimum-cli export openvino --model {ckpt.hf_dir} {args} --weight-format fp32 "
             f"{Path(cache_dir) / 'engines'}/{ckpt.digest[:24]}-{ref}"]
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
            from builder.engines import tensorrt_encoder, tensorrt_llm

            target = tensorrt_llm if spec.kind == "llm" else tensorrt_encoder
            out.append(target.format_plan(spec, ckpt.hf_dir, Path(output)).rstrip("\n"))
        else:
            out.append("\n".join(_cpu_plan(spec, ckpt, context, cache_dir)))
    out.append(f"# repository: {output} (written atomically; manifest.json last)")
    return "\n\n".join(out) + "\n"
