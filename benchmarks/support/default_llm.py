"""The default LLM at int8 as the serving benchmarks build and call it (bench_openai, bench_metrics)."""

from __future__ import annotations

from pathlib import Path

import httpx

from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.paths import cache_root
from tests.support.serve import Serve

MODEL = "smollm2-135m-instruct:int8"
NEW_TOKENS = 128


def build_default_int8(repository: Path) -> Path:
    """SmolLM2 int8 (batch 8, context 2048) into `repository`; engines come from the shared cache."""
    build([DeploymentSpec("smollm2-135m-instruct", precisions=["int8"], context_size=2048, max_batch_size=8)],
          BuildOptions(output=repository, cache_dir=cache_root(), echo=lambda _: None))
    return repository


def chat_tokens(serve: Serve, key: str, messages, client: httpx.Client) -> int:
    """One greedy /v1 chat completion of NEW_TOKENS; the completion tokens it was billed."""
    r = client.post(f"{serve.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                    json={"model": MODEL, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]
