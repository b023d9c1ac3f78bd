"""The gateway's shared parts, built once per app and handed to the routes as a dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from builder.serve.gateway.auth import KeyGuard
from builder.serve.gateway.config import GatewayConfig
from builder.serve.gateway.deployments import Catalog
from builder.serve.gateway.keys import KeyRecord
from builder.serve.gateway.lifecycle import Lifecycle
from builder.serve.gateway.metrics import GatewayMetrics
from builder.serve.gateway.tokens import TokenCounters
from builder.serve.gateway.waking import WakingTriton


@dataclass
class Gateway:
    config: GatewayConfig
    catalog: Catalog
    triton: WakingTriton            # Triton, with scale to zero in front
    guard: KeyGuard | None          # None: public, no keys
    tokens: TokenCounters
    metrics: GatewayMetrics

    @property
    def lifecycle(self) -> Lifecycle:
        return self.triton.lifecycle


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(gateway)]


def require_key(request: Request) -> KeyRecord | None:
    """Dependency of every /v1 route: a valid, non-rate-limited key unless the gateway is public."""
    guard = gateway(request).guard
    if guard is None:
        return None
    record = guard.check(request.headers.get("authorization"))
    request.state.key_name = record.name     # per-key usage metrics: the name, never the key
    return record

