"""Which deployments exist: the repository's manifest.json, read with plain json.

`deployments()` is the one function that knows the manifest's layout, so it can later be swapped
for the typed reader. `Catalog` re-reads the manifest when it changes (a pull swaps repositories
while the gateway runs) and resolves the model ids clients send: `name:precision`, or the Triton
name `name-precision`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.contract.naming import DeploymentName
from backends.errors import InvalidArgumentError
from builder.serve.gateway.errors import ApiError, bad_request

log = logging.getLogger("serverless_triton.gateway")
MANIFEST = "manifest.json"
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

    @property
    def name(self) -> str:
        return self.id.rpartition(":")[0]


def _entry(user_id: str, entry: dict[str, Any], created: int) -> Deployment:
    dep = DeploymentName.parse(user_id)
    kind = entry.get("kind", "llm")
    points = entry.get("entrypoints") or {}
    engine = entry.get("engine") or {}
    infer = points.get("infer") or entry.get("entrypoint") or (dep.llm if kind == "llm" else dep.embedding)
    stream = points.get("stream") or (dep.llm_stream if kind == "llm" else None)
    return Deployment(id=str(dep), kind=kind, infer=infer, stream=stream, context_size=engine.get("context_size"),
                      max_batch_size=engine.get("max_batch_size"), dimension=engine.get("dimension"), created=created)


def deployments(repository: Path) -> dict[str, Deployment]:
    """Deployments listed in `<repository>/manifest.json`, by `name:precision` (none without one)."""
    path = Path(repository) / MANIFEST
    try:
        data = json.loads(path.read_text())
        created = int(path.stat().st_mtime)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("cannot read %s (%s): no deployments until it is fixed", path, e)
        return {}
    out: dict[str, Deployment] = {}
    for user_id, entry in (data.get("deployments") or {}).items():
        try:
            dep = _entry(user_id, entry, created)
        except InvalidArgumentError:
            continue
        out[dep.id] = dep
    return out


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
            st = os.stat(self.repository / MANIFEST)
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
        if model in self._items:
            return self._items[model]
        return next((d for d in self._items.values() if model in (d.infer, d.stream)), None)

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
