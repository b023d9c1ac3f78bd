"""POST /v1/embeddings: texts -> vectors, as floats or base64 (little-endian float32, which is
what the openai client asks for by default and decodes with numpy)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from builder.serve.gateway.body import parse, text_list
from builder.serve.gateway.errors import bad_request, unsupported
from builder.serve.gateway.generation import all_of
from builder.serve.gateway.metrics import usage_recorder
from builder.serve.gateway.schemas import MAX_EMBEDDING_INPUTS, EmbeddingRequest
from builder.serve.gateway.state import GatewayDep, require_key

router = APIRouter(dependencies=[Depends(require_key)])


def texts_of(value: Any) -> list[str]:
    texts = text_list(value, "input", MAX_EMBEDDING_INPUTS)
    for i, t in enumerate(texts):
        if not t:
            raise bad_request(f"input[{i}] is an empty string: send some text", "input" if len(texts) == 1 else f"input[{i}]")
    return texts


def encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


@router.post("/v1/embeddings")
async def embeddings(request: Request, gw: GatewayDep) -> Response:
    req = await parse(request, EmbeddingRequest)
    dep = gw.catalog.resolve(req.model, "embedding")
    texts = texts_of(req.input)
    if req.dimensions is not None and req.dimensions != dep.dimension:
        raise unsupported("dimensions", f"{dep.id} produces vectors of one size ({dep.dimension or 'fixed'}) "
                                        "and cannot shorten them; leave dimensions out")
    config = await gw.triton.config(dep.infer)
    size = int(config.get("max_batch_size") or dep.max_batch_size or 1)
    chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
    counting = asyncio.to_thread(gw.tokens.count, dep.name, texts)
    parts, tokens = await asyncio.gather(all_of(gw.triton.embed(dep.infer, c) for c in chunks), counting)
    vectors = np.concatenate(parts, axis=0)
    usage_recorder(request, gw.metrics, dep.id, embedding=True)({"prompt_tokens": tokens})
    fmt = req.encoding_format or "float"
    return JSONResponse({
        "object": "list", "model": dep.id,
        "data": [{"object": "embedding", "index": i, "embedding": encode(v, fmt)} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
