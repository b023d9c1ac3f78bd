"""Everything the gateway needs to know about its surroundings, in one value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class GatewayConfig:
    """triton_url is `host:port` (or a full http:// URL) of Triton's HTTP API; state_dir holds
    api-keys.json (required unless public)."""

    triton_url: str
    repository: Path
    state_dir: Path | None = None
    public: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout: float = 600.0
    default_max_tokens: int | None = None   # cap for chat requests without max_tokens (None: the room left)
    max_connections: int = 512
    idle_timeout: float = 0.0               # scale to zero: seconds without requests before unloading (0: never)
    idle_timeouts: dict[str, float] = field(default_factory=dict)   # by deployment name (or name:precision)
    hold_limit: float = 120.0               # longest a request waits for its deployment to load (then 503)
    memory_budget: int = 0                  # bytes the loaded deployments may hold (0: no budget)
    max_queue: int | None = None            # backpressure: requests queued past max_batch_size (None: 2x it)
    max_queues: dict[str, int] = field(default_factory=dict)       # by deployment name (or name:precision)
    metrics: bool = True                    # False: no gateway series (serve --no-metrics)
    triton_grpc: str = ""                    # Triton's gRPC host:port, for the waking gRPC relay
    grpc_port: int = 0                      # the relay's loopback port (0: no relay)

    @property
    def triton_base_url(self) -> str:
        url = self.triton_url.rstrip("/")
        return url if url.startswith(("http://", "https://")) else f"http://{url}"
