"""Scale to zero: which deployments are loaded in Triton, loading them when a request needs one
(once, however many requests wait) and unloading those idle for longer than their timeout.

Triton never loads or unloads by itself (its maintainers' advice: a layer in front that loads on
demand), and two concurrent loads of one model can load it twice: this is that layer, and the one
place that asks Triton to load or unload. A deployment is all of its Triton models; models shared
by several deployments (a name's preprocessing, postprocessing, tokenizer, pooling) stay loaded
while any deployment that uses them is. Idleness is the later of the last request seen here and
Triton's own `last_inference` of the deployment's models (which gRPC calls update too), and a
deployment with a request in flight is never unloaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("serverless_triton.lifecycle")

LOADED, UNLOADED, LOADING, UNLOADING, FAILED = "loaded", "unloaded", "loading", "unloading", "failed"
FIRST_BACKOFF = 2.0          # seconds before a failed load is tried again; doubles up to MAX_BACKOFF
MAX_BACKOFF = 60.0


class RepositoryApi(Protocol):
    """Triton's model-repository API (builder/serve/gateway/triton_client.TritonClient)."""

    async def load(self, model: str) -> None: ...
    async def unload(self, model: str) -> None: ...
    async def reload(self, model: str) -> None: ...             # unload, then load (a dead stub)
    async def ready_models(self) -> set[str]: ...
    async def last_inference(self) -> dict[str, float]: ...   # model -> unix seconds (0: never)


def no_measure(d: "Tracked") -> int:
    return d.memory_bytes


class NotServable(Exception):
    """The deployment cannot be loaded now; `retry_after` seconds until it is tried again."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(NotServable):
    """The deployment's queue is full (backpressure): answered at once, never queued."""


class EngineDied(NotServable):
    """A process serving the deployment died while the request was inside it (it is being reloaded)."""


@dataclass
class Tracked:
    """One deployment's serving state, as `serverless-triton status` shows it."""

    id: str                          # name:precision
    models: tuple[str, ...]          # its Triton models, in load order
    idle_timeout: float              # seconds; 0: never unloaded
    memory_bytes: int = 0            # what the budget counts: build_bytes, then see _load
    build_bytes: int = 0             # measured at build time under load (manifest), 0 if unknown
    state: str = UNLOADED
    last_request: float = 0.0       # unix seconds
    in_flight: int = 0
    cold_starts: int = 0
    last_cold_start_s: float | None = None
    load_seconds: dict[str, float] = field(default_factory=dict)   # the last cold start, per Triton model
    failure: str = ""
    retry_at: float = 0.0            # monotonic: no new load attempt before
    backoff: float = FIRST_BACKOFF
    loading: asyncio.Task | None = field(default=None, repr=False)
    max_in_flight: int = 0           # backpressure: max_batch_size + queue (0: no bound)
    overloaded: int = 0              # requests refused because the queue was full
    stub_restarts: int = 0           # reloads after a stub process died

    def __post_init__(self) -> None:
        self.memory_bytes = self.memory_bytes or self.build_bytes
    # set when a stub of the deployment dies: the requests inside it then fail at once (and a new
    # event serves the requests after the reload)
    broken: asyncio.Event = field(default_factory=asyncio.Event, repr=False)


class Lifecycle:
    def __init__(self, api: RepositoryApi, hold_limit: float = 120.0, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, memory_budget: int = 0,
                 measure: Callable[[Tracked], int] = no_measure,
                 dead_stubs: Callable[[tuple[str, ...]], set[str]] | None = None):
        """`memory_budget` (bytes, 0: none): loading a deployment that would exceed it first unloads
        the least recently used idle ones; `measure` gives a loaded deployment's resident memory;
        `dead_stubs(models)` names the loaded models whose Python stub died (gateway/stubs.py)."""
        self.api, self.hold_limit = api, hold_limit
        self.dead_stubs = dead_stubs
        self.healing: set[str] = set()    # deployments being reloaded after a stub died
        self.memory_budget, self.measure = memory_budget, measure
        self.ensembles: set[str] = set()     # Triton models that are ensembles: loaded after their steps
        self.clock, self.monotonic = clock, monotonic
        self.deployments: dict[str, Tracked] = {}
        self._lock = asyncio.Lock()          # one load or unload decision at a time
        self.on_cold_start: Callable[[str, float], None] | None = None   # (deployment, seconds): metrics

    def track(self, deployments: list[Tracked]) -> None:
        """Set the deployments to manage (after a manifest change); keeps the state of known ones."""
        known = self.deployments
        self.deployments = {d.id: known.get(d.id, d) for d in deployments}
        for d in deployments:
            if d.id in known:
                known[d.id].models, known[d.id].idle_timeout = d.models, d.idle_timeout
                known[d.id].max_in_flight = d.max_in_flight
                if known[d.id].build_bytes != d.build_bytes:   # rebuilt: its next load measures afresh
                    known[d.id].build_bytes = known[d.id].memory_bytes = d.build_bytes

    async def sync(self) -> None:
        """Learn from Triton which deployments are loaded (at start, and every sweep: a repository
        refresh reloads changed models behind this layer's back)."""
        ready = await self.api.ready_models()
        for d in self.deployments.values():
            if d.state in (LOADED, UNLOADED):   # not while this layer is loading or unloading it
                d.state = LOADED if set(d.models) <= ready else UNLOADED

    # -- requests -------------------------------------------------------------------------------
    @asynccontextmanager
    async def serving(self, deployment_id: str, bounded: bool = True) -> AsyncIterator[Tracked]:
        """Around one request: the deployment is loaded (woken if need be) and cannot be unloaded
        until the request ends. `bounded`: refused (Overloaded) when max_in_flight are in flight."""
        d = self.deployments[deployment_id]
        if bounded and d.max_in_flight and d.in_flight >= d.max_in_flight:
            d.overloaded += 1
            raise Overloaded(f"{d.id} is at capacity: {d.in_flight} requests in flight or queued (its bound is "
                             f"{d.max_in_flight}: max_batch_size + serve --max-queue); retry shortly", 1.0)
        d.in_flight += 1
        d.last_request = self.clock()
        try:
            await self.ensure_loaded(d)
            yield d
        finally:
            d.in_flight -= 1
            d.last_request = self.clock()

    async def ensure_loaded(self, d: Tracked) -> None:
        """Return once `d` is loaded; one load however many requests wait. Raises NotServable
        when the load failed (and backs off), or when it takes longer than the hold limit."""
        if d.state == LOADED:
            return
        if d.state == FAILED and self.monotonic() < d.retry_at:
            raise NotServable(f"{d.id} failed to load ({d.failure}); retrying in "
                              f"{d.retry_at - self.monotonic():.0f} s", d.retry_at - self.monotonic())
        async with self._lock:
            if d.state != LOADED and (d.loading is None or d.loading.done()):
                d.loading = asyncio.create_task(self._load(d))
        try:
            await asyncio.wait_for(asyncio.shield(d.loading), self.hold_limit)
        except asyncio.TimeoutError:
            raise NotServable(f"{d.id} is still loading after {self.hold_limit:.0f} s; retry shortly", 5.0) from None
        if d.state != LOADED:
            raise NotServable(f"{d.id} failed to load ({d.failure}); retrying in {d.backoff:.0f} s",
                              max(d.retry_at - self.monotonic(), 1.0))

    async def _load_one(self, d: Tracked, model: str) -> None:
        t0 = self.monotonic()
        await self.api.load(model)
        d.load_seconds[model] = self.monotonic() - t0

    async def _load(self, d: Tracked) -> None:
        """Every model but the ensembles at once (Python models call each other only at request
        time, so their stubs start in parallel), then the ensembles, which Triton checks against
        their steps."""
        d.state, t0 = LOADING, self.monotonic()
        d.load_seconds = {}
        ensembles = [m for m in d.models if m in self.ensembles]
        others = [m for m in d.models if m not in self.ensembles]
        try:
            await self._make_room(d)
            results = await asyncio.gather(*(self._load_one(d, m) for m in others), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            for model in ensembles:
                await self._load_one(d, model)
        except Exception as e:  # any failure: the deployment is not servable; back off
            d.state, d.failure = FAILED, str(e) or type(e).__name__
            d.retry_at = self.monotonic() + d.backoff
            d.backoff = min(d.backoff * 2, MAX_BACKOFF)
            log.warning("loading %s failed: %s", d.id, d.failure)
            return
        d.state, d.failure, d.backoff = LOADED, "", FIRST_BACKOFF
        # the larger of the build's figure and the stubs' resident memory now: a freshly loaded
        # engine has not yet repacked its weights nor grown its KV cache (SmolLM2 int8: ~190 MB
        # loaded, ~590 MB after 8 concurrent 1k-token prompts), and the build measured it under load
        d.memory_bytes = max(self.measure(d), d.build_bytes)
        d.cold_starts += 1
        d.last_cold_start_s = self.monotonic() - t0
        if self.on_cold_start is not None:
            self.on_cold_start(d.id, d.last_cold_start_s)
        log.info("loaded %s in %.2f s", d.id, d.last_cold_start_s)

    async def _make_room(self, d: Tracked) -> None:
        """Unload least recently used idle deployments until `d` fits the memory budget; raise
        (nothing is loaded) when it cannot fit."""
        if not self.memory_budget:
            return
        need = d.memory_bytes or max((o.memory_bytes for o in self.deployments.values()), default=0)

        def used() -> int:
            return sum(o.memory_bytes for o in self.deployments.values() if o is not d and o.state in (LOADED, LOADING))

        for other in sorted((o for o in self.deployments.values() if o is not d and o.state == LOADED),
                            key=lambda o: o.last_request):
            if used() + need <= self.memory_budget:
                return
            if not other.in_flight and await self.unload(other.id):
                log.info("unloaded %s to make room for %s (memory budget)", other.id, d.id)
        if used() + need > self.memory_budget:
            mib = 2**20
            raise MemoryError(f"the memory budget of {self.memory_budget // mib} MiB is taken: loading it needs "
                              f"{need // mib} MiB and the loaded deployments hold {used() // mib} MiB, with "
                              "requests in flight; retry later, unload one (serverless-triton unload), or raise "
                              "serve --memory-budget")

    # -- idle unloading -------------------------------------------------------------------------
    async def sweep(self) -> list[str]:
        """Unload every loaded deployment idle past its timeout with nothing in flight; returns them."""
        idle_candidates = [d for d in self.deployments.values()
                           if d.state == LOADED and d.idle_timeout > 0 and d.in_flight == 0]
        if not idle_candidates:
            return []
        seen = await self.api.last_inference()
        now = self.clock()
        unloaded = []
        for d in idle_candidates:
            last = max([d.last_request] + [seen.get(m, 0.0) for m in d.models])
            if now - last >= d.idle_timeout and await self.unload(d.id, idle_since=d.last_request):
                unloaded.append(d.id)
        return unloaded

    async def unload(self, deployment_id: str, idle_since: float | None = None) -> bool:
        """Unload a deployment now (models another loaded deployment uses stay); True if it is
        unloaded. False, and nothing done, while a request is in flight or it is loading, or
        (`idle_since`) when a request came since.

        Requests that arrive meanwhile wait (the lock) and load it again; Triton itself lets
        requests already inside a model finish before that model goes."""
        async with self._lock:
            d = self.deployments[deployment_id]
            if d.state == UNLOADED:
                return True
            if d.in_flight or d.state not in (LOADED, FAILED) or (idle_since is not None
                                                                   and d.last_request > idle_since):
                return False
            d.state = UNLOADING
            others = {m for o in self.deployments.values() if o is not d and o.state in (LOADED, LOADING)
                      for m in o.models}
            try:
                for model in reversed(d.models):   # the ensemble first, then what it calls
                    if model not in others:
                        await self.api.unload(model)
            finally:
                d.state = UNLOADED
            log.info("unloaded %s", d.id)
            return True

    # -- dead stubs ---------------------------------------------------------------------------------
    async def heal(self) -> list[str]:
        """Reload every loaded model whose Python stub died (Triton 2.51 keeps such a model READY
        and fails every request to it); the requests in flight on its deployments fail at once
        (their `broken` event). Returns the models reloaded."""
        if self.dead_stubs is None:
            return []
        loaded = [d for d in self.deployments.values() if d.state == LOADED]
        dead = self.dead_stubs(tuple(dict.fromkeys(m for d in loaded for m in d.models)))
        if not dead:
            return []
        hit = [d for d in loaded if dead & set(d.models)]
        self.healing.update(d.id for d in hit)
        task = asyncio.create_task(self._reload(sorted(dead), hit))
        for d in hit:
            log.warning("a stub of %s died (%s): failing its %d request(s) in flight and reloading it",
                        d.id, ", ".join(sorted(dead & set(d.models))), d.in_flight)
            d.broken.set()
            d.broken = asyncio.Event()
            d.state, d.loading = LOADING, task      # new requests wait for the reload (hold limit)
        return await task

    async def _reload(self, dead: list[str], hit: list[Tracked]) -> list[str]:
        try:
            return await self._reload_models(dead, hit)
        finally:
            self.healing.difference_update(d.id for d in hit)

    def unready(self) -> list[str]:
        """Deployments that cannot serve now although Triton says READY: a stub died, and the
        reload has not finished (or has not started: the watch runs every second)."""
        loaded = [d for d in self.deployments.values() if d.state == LOADED]
        dead = self.dead_stubs(tuple(dict.fromkeys(m for d in loaded for m in d.models))) if self.dead_stubs else set()
        return sorted(self.healing | {d.id for d in loaded if dead & set(d.models)})

    async def _reload_models(self, dead: list[str], hit: list[Tracked]) -> list[str]:
        reloaded = []
        async with self._lock:
            try:
                for model in dead:
                    await self.api.reload(model)
                    reloaded.append(model)
            except Exception as e:  # noqa: BLE001 -- any failure: the deployments back off and retry
                for d in hit:
                    d.state, d.failure = FAILED, f"reloading after a stub died failed: {e}"
                    d.retry_at = self.monotonic() + d.backoff
                log.error("reloading %s after its stub died failed: %s", ", ".join(sorted(dead)), e)
                return reloaded
        for d in hit:
            d.state = LOADED
            d.stub_restarts += 1
        log.warning("reloaded %s: serving again", ", ".join(reloaded))
        return reloaded

    async def run(self, period: float = 1.0) -> None:
        """The watch: forever, every `period` seconds, learn what Triton has loaded (a restarted
        Triton loads everything again), reload models whose stub died, unload idle deployments."""
        while True:
            await asyncio.sleep(period)
            try:
                await self.sync()
                await self.heal()
                await self.sweep()
            except Exception as e:  # Triton restarting, a transient error: try again next period
                log.warning("lifecycle watch failed: %s", e)
