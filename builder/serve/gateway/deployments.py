"""Which deployments exist: the repository's manifest (backends/contract/manifest.py).

`Catalog` re-reads the manifest when it changes (a pull swaps repositories while the gateway runs)
and resolves the model ids clients send: `name:precision`, or a Triton name of the deployment.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from backends.contract.manifest import MANIFEST_NAME, DeploymentEntry, read_manifest
from backends.errors import UserError
from builder.serve.gateway.errors import ApiError, bad_request

log = logging.getLogger("serverless_triton.gateway")
RECHECK_SECONDS = 1.0


@dataclass(frozen=True)
class Deployment:
    """One deployment as the gateway serves it."""

    id: str                      # name:precision
    kind: str                    # llm | embedding
    infer: str                   # Triton model for /generate or /infer
    stream: str | None           # Triton model for /generate_stream (llm only)
    context_size: int | None
    max_batch_size: int | None
    dimension: int | None = None
    created: int = 0
    models: tuple[str, ...] = ()  # every Triton model of the deployment, dependencies first
    memory_bytes: int = 0         # the build's estimate of what it holds loaded (0: unknown)

    @property
    def name(self) -> str:
        return self.id.rpartition(":")[0]


def _deployment(entry: DeploymentEntry, created: int) -> Deployment:
    engine = entry.engine
    return Deployment(id=entry.user_name, kind=entry.kind, infer=entry.entrypoints["infer"],
                      stream=entry.entrypoints.get("stream"), context_size=engine.get("context_size"),
                      max_batch_size=engine.get("max_batch_size"), dimension=engine.get("dimension"),
                      created=created, models=tuple(entry.triton_models),
                      memory_bytes=int(engine.get("memory_bytes") or 0))


def deployments(repository: Path) -> dict[str, Deployment]:
    """The manifest's deployments, by `name:precision` (none without a readable manifest)."""
    path = Path(repository) / MANIFEST_NAME
    try:
        manifest = read_manifest(repository)
        created = int(path.stat().st_mtime) if path.exists() else 0
    except (UserError, OSError) as e:
        log.warning("cannot read %s (%s): no deployments until it is fixed", path, e)
        return {}
    return {e.user_name: _deployment(e, created) for e in manifest.deployments.values()}


class Catalog:
    """The manifest's deployments, re-read when the file changes (checked at most once a second)."""

    def __init__(self, repository: Path):
        self.repository = Path(repository)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._items: dict[str, Deployment] = {}
        self.refresh()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.repository / MANIFEST_NAME)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self, force: bool = True) -> bool:
        """Re-read the manifest if it changed; True when it did."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < RECHECK_SECONDS:
                return False
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp and not force:
                return False
            self._stamp, self._items = stamp, deployments(self.repository)
            return True

    def all(self) -> list[Deployment]:
        self.refresh(force=False)
        return sorted(self._items.values(), key=lambda d: d.id)

    def find(self, model: str) -> Deployment | None:
        """By `name:precision` or by its Triton name."""
        self.refresh(force=False)
        return self._items.get(model) or self.owner(model)

    def owner(self, triton_model: str) -> Deployment | None:
        """The deployment an entry point (ensemble, stream model) belongs to, for /v2 requests."""
        self.refresh(force=False)
        return next((d for d in self._items.values() if triton_model in (d.infer, d.stream)), None)

    def resolve(self, model: str, kind: str | None = None) -> Deployment:
        """The deployment a request names; 404 if none, 400 if it is the wrong kind for the endpoint."""
        dep = self.find(model)
        if dep is None:
            known = ", ".join(d.id for d in self.all()) or "none"
            raise ApiError(404, f"The model '{model}' does not exist (deployments here: {known})",
                           param="model", code="model_not_found")
        if kind is not None and dep.kind != kind:
            endpoint = "/v1/embeddings" if dep.kind == "embedding" else "/v1/chat/completions or /v1/completions"
            raise bad_request(f"{dep.id} is an {dep.kind} deployment: call it through {endpoint}",
                              param="model", code="invalid_model_kind")
        return dep
