"""`build-engines`: compile models into per-precision engines and a Triton model repository."""

from __future__ import annotations

from pathlib import Path

import click

from backends.contract.precisions import DEFAULT_PRECISIONS, PRECISIONS, parse_precisions
from backends.errors import InvalidArgumentError
from builder.build.deployment import ENGINES, KINDS, POOLINGS, DeploymentSpec, load_deployment_file
from builder.build.pipeline import BuildOptions, build
from builder.build.plan import format_plan
from builder.build.sources.checkpoint import default_name
from builder.cli.base import Command
from builder.paths import cache_root
from builder.serve.storage import push as push_repository


def _specs_from_options(source, name, kind, precision, context_size, max_batch_size, engine, pooling,
                        prompt_lookup=False, memory_test=True):
    if source and Path(source).suffix == ".toml":
        if prompt_lookup:
            raise InvalidArgumentError("--prompt-lookup does not apply to a deployment file: set "
                                       "prompt_lookup = true in its [[models]] table instead")
        specs, serving = load_deployment_file(Path(source))
        for spec in specs:      # a build choice, not a deployment's: --no-memory-test applies to all
            spec.memory_test = spec.memory_test and memory_test
        return specs, serving
    src = source or "default"
    if name is None:
        if src != "default":
            raise InvalidArgumentError("--name is required when a model source is given (e.g. --name my-model)")
        name = default_name(kind)
    spec = DeploymentSpec(name=name, kind=kind, source=src, precisions=parse_precisions(precision),
                          context_size=context_size, max_batch_size=max_batch_size, engine=engine,
                          pooling=pooling, prompt_lookup=prompt_lookup, memory_test=memory_test)
    return [spec], None


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", required=False)
@click.option("--name", help="Deployment name (users then call NAME:PRECISION). Default: the embedded model's.")
@click.option("--kind", type=click.Choice(KINDS), default="llm", show_default=True)
@click.option("--precision", default=",".join(DEFAULT_PRECISIONS), show_default=True,
              help=f"Comma-separated, from: {', '.join(PRECISIONS)}.")
@click.option("--context-size", type=int, help="Tokens of prompt + output. Default: the model's position limit.")
@click.option("--max-batch-size", type=int,
              help="LLM: requests batched in flight per engine (default 16). Embedding: most texts per "
                   "request (default 64).")
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
              help="auto: TensorRT-LLM where tensorrt_llm and a GPU are present, else the CPU engine.")
@click.option("--pooling", type=click.Choice(POOLINGS), help="Embeddings: pooling when the checkpoint has none.")
@click.option("--prompt-lookup", is_flag=True,
              help="CPU LLM: prompt-lookup decoding for every request (several tokens a step where the "
                   "answer copies the prompt: summaries, RAG, code edits; slower on full batches of "
                   "answers that copy nothing).")
@click.option("--no-memory-test", "memory_test", is_flag=True, default=True, flag_value=False,
              help="Skip the load test that measures each CPU engine's resident memory (~20 s per LLM "
                   "precision on 2 cores); the manifest records an estimate from the weights, which "
                   "serve's memory budget counts until it measures the loaded stubs.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("model_repository_out"),
              show_default=True, help="Triton model repository to write (created or updated).")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              default=cache_root, show_default="$XDG_CACHE_HOME/serverless-triton",
              help="Converted checkpoints and fp32 reference exports, reused across builds.")
@click.option("--force", is_flag=True, help="Rebuild even when nothing changed.")
@click.option("--dry-run", is_flag=True, help="Print the build plan and exit.")
@click.option("--push", metavar="S3_URL", help="Push the repository to object storage after the build.")
@click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint for --push.")
def build_engines(source, name, kind, precision, context_size, max_batch_size, engine, pooling, prompt_lookup,
                  memory_test, output, cache_dir, force, dry_run, push, endpoint_url):
    """Build SOURCE into one engine per precision and a Triton model repository.

    SOURCE is a Hugging Face directory (config.json, *.safetensors, tokenizer.json), a GGUF file, or
    a deployment file (*.toml) describing several models. Without SOURCE the embedded default is
    built: SmolLM2-135M-Instruct (--kind llm) or all-MiniLM-L6-v2 (--kind embedding).

    \b
    Examples:
      build-engines --precision int8 -o repo
      build-engines ./my-llama --name my-llama --precision fp16,int8 --context-size 4096
      build-engines deployment.toml -o repo
    """
    specs, _serving = _specs_from_options(source, name, kind, precision, context_size, max_batch_size, engine,
                                          pooling, prompt_lookup, memory_test)
    if dry_run:
        click.echo(format_plan(specs, output, cache_dir))
        return
    result = build(specs, BuildOptions(output=output, cache_dir=cache_dir, force=force, echo=click.echo))
    for dep in result.up_to_date:
        click.echo(f"{dep}: up to date")
    click.echo(f"repository {result.output}: {len(result.built)} built, {len(result.up_to_date)} up to date")
    if push:
        report = push_repository(result.output, push, endpoint_url=endpoint_url)
        click.echo(report.summary())
