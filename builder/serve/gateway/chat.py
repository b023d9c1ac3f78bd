"""POST /v1/chat/completions: messages through the model's chat template, n choices, streaming."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from builder.serve.gateway.body import parse
from builder.serve.gateway.deployments import Deployment
from builder.serve.gateway.generation import Plan, all_of, close_all, generate, open_streams, pieces
from builder.serve.gateway.messages import normalize_messages
from builder.serve.gateway.metrics import usage_recorder
from builder.serve.gateway.params import choice_seeds, refuse_unsupported, sampling_body, with_seed
from builder.serve.gateway.responses import Usage, new_id, now
from builder.serve.gateway.schemas import ChatCompletionRequest
from builder.serve.gateway.sse import DONE, chunk_writer, streaming_response
from builder.serve.gateway.state import GatewayDep, require_key
from builder.serve.gateway.triton_client import TritonStream

router = APIRouter(dependencies=[Depends(require_key)])


def plans_for(req: ChatCompletionRequest, dep: Deployment, cap: int | None) -> list[Plan]:
    """One Triton request per choice; max_completion_tokens wins over max_tokens."""
    base = {"messages": json.dumps(normalize_messages(req.messages)), **sampling_body(req)}
    max_tokens = req.max_completion_tokens or req.max_tokens
    return [Plan(dep, with_seed(base, seed), max_tokens, cap) for seed in choice_seeds(req.seed, req.n or 1)]


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, gw: GatewayDep) -> Response:
    req = await parse(request, ChatCompletionRequest)
    refuse_unsupported(req)
    dep = gw.catalog.resolve(req.model, "llm")
    record = usage_recorder(request, gw.metrics, dep.id)
    plans = plans_for(req, dep, gw.config.default_max_tokens)
    if req.stream:
        opened = await open_streams(gw.triton, plans)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return streaming_response(_stream(opened, plans, dep, include_usage, record),
                                  close=lambda: close_all(opened))
    results = await all_of(generate(gw.triton, p) for p in plans)
    usage = Usage()
    for i, r in enumerate(results):
        usage.add(0, i, r)
    record(usage.body())
    return JSONResponse({
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": dep.id,
        "system_fingerprint": None,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.get("text_output", ""), "refusal": None},
                     "logprobs": None, "finish_reason": r.get("finish_reason") or "stop"} for i, r in enumerate(results)],
        "usage": usage.body(),
    })


async def _stream(opened: list[tuple[TritonStream, dict[str, Any] | None]], plans: list[Plan], dep: Deployment,
                  include_usage: bool, record: Callable[[dict[str, Any]], None]) -> AsyncIterator[bytes]:
    """chat.completion.chunk events: the role first, then text, finish_reason once, usage, [DONE]."""
    usage = Usage()
    chunk = chunk_writer("chat.completion.chunk", new_id("chatcmpl"), now(), dep.id, include_usage)

    def choice(index: int, delta: dict[str, str], reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

    for i in range(len(opened)):
        yield chunk([choice(i, {"role": "assistant", "content": ""})])
    async for index, text, reason in pieces(opened, plans, usage):
        yield chunk([choice(index, {"content": text} if text else {}, reason)])
    record(usage.body())
    if include_usage:
        yield chunk([], usage.body())
    yield DONE
