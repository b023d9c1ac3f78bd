"""GET /v1/models and /v1/models/{id}: the deployments the manifest lists, by `name:precision`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from builder.serve.gateway.deployments import Deployment
from builder.serve.gateway.state import GatewayDep, require_key

router = APIRouter(dependencies=[Depends(require_key)])
OWNER = "serverless-triton"


def card(dep: Deployment) -> dict[str, Any]:
    """OpenAI's model object, plus what a client needs to size requests (extra fields are allowed)."""
    out: dict[str, Any] = {"id": dep.id, "object": "model", "created": dep.created, "owned_by": OWNER,
                           "kind": dep.kind}
    if dep.kind == "llm":
        out["context_length"] = dep.context_size
    elif dep.dimension:
        out["dimension"] = dep.dimension
    return out


@router.get("/v1/models")
async def list_models(gw: GatewayDep) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [card(d) for d in gw.catalog.all()]})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, gw: GatewayDep) -> JSONResponse:
    return JSONResponse(card(gw.catalog.resolve(model_id)))
