"""POST /v1/completions: plain prompts (no chat template), several prompts, n choices, echo."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from builder.serve.gateway.body import parse, text_list
from builder.serve.gateway.deployments import Deployment
from builder.serve.gateway.generation import Plan, all_of, close_all, generate, open_streams, pieces
from builder.serve.gateway.metrics import usage_recorder
from builder.serve.gateway.params import choice_seeds, refuse_unsupported, sampling_body, with_seed
from builder.serve.gateway.responses import Usage, new_id, now
from builder.serve.gateway.schemas import CompletionRequest
from builder.serve.gateway.sse import DONE, chunk_writer, streaming_response
from builder.serve.gateway.state import GatewayDep, require_key
from builder.serve.gateway.triton_client import TritonStream

router = APIRouter(dependencies=[Depends(require_key)])
DEFAULT_MAX_TOKENS = 16    # OpenAI's documented default for /v1/completions
MAX_PROMPTS = 64


def prompts_of(prompt: Any) -> list[str]:
    """The request's prompts as strings; token-id prompts are refused (the engines take text)."""
    return text_list(prompt, "prompt", MAX_PROMPTS)


def plans_for(req: CompletionRequest, dep: Deployment, prompts: list[str]) -> list[Plan]:
    """n plans per prompt, choice index = prompt * n + choice, as OpenAI orders them."""
    base, n = sampling_body(req), req.n or 1
    max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
    return [Plan(dep, with_seed({"text_input": p, **base}, seed), max_tokens, prompt_index=k,
                 prompt_param="prompt")
            for k, p in enumerate(prompts) for seed in choice_seeds(req.seed, n)]


@router.post("/v1/completions")
async def completions(request: Request, gw: GatewayDep) -> Response:
    req = await parse(request, CompletionRequest)
    refuse_unsupported(req)
    dep = gw.catalog.resolve(req.model, "llm")
    record = usage_recorder(request, gw.metrics, dep.id)
    prompts = prompts_of(req.prompt)
    plans = plans_for(req, dep, prompts)
    echoes = [prompts[p.prompt_index] if req.echo else "" for p in plans]
    if req.stream:
        opened = await open_streams(gw.triton, plans)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return streaming_response(_stream(opened, plans, dep, echoes, include_usage, record),
                                  close=lambda: close_all(opened))
    results = await all_of(generate(gw.triton, p) for p in plans)
    usage = Usage()
    for i, (p, r) in enumerate(zip(plans, results)):
        usage.add(p.prompt_index, i, r)
    record(usage.body())
    return JSONResponse({
        "id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": dep.id,
        "system_fingerprint": None,
        "choices": [{"index": i, "text": echoes[i] + r.get("text_output", ""), "logprobs": None,
                     "finish_reason": r.get("finish_reason") or "stop"} for i, r in enumerate(results)],
        "usage": usage.body(),
    })


async def _stream(opened: list[tuple[TritonStream, dict[str, Any] | None]], plans: list[Plan], dep: Deployment,
                  echoes: list[str], include_usage: bool,
                  record: Callable[[dict[str, Any]], None]) -> AsyncIterator[bytes]:
    """text_completion events: the echoed prompt first (if asked), text, finish_reason once, usage, [DONE]."""
    usage = Usage()
    chunk = chunk_writer("text_completion", new_id("cmpl"), now(), dep.id, include_usage)

    for i, echo in enumerate(echoes):
        if echo:
            yield chunk([{"index": i, "text": echo, "logprobs": None, "finish_reason": None}])
    async for index, text, reason in pieces(opened, plans, usage):
        yield chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": reason}])
    record(usage.body())
    if include_usage:
        yield chunk([], usage.body())
    yield DONE
