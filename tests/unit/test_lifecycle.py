"""Scale to zero's bookkeeping against a fake Triton repository API: one load however many requests
wait, back-off after a failed load, idle unloading that spares in-flight requests and shared models."""

from __future__ import annotations

import asyncio

import pytest

from builder.serve.gateway.lifecycle import FAILED, LOADED, UNLOADED, Lifecycle, NotServable, Tracked


class FakeTriton:
    def __init__(self, load_seconds: float = 0.05):
        self.loaded: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self.last: dict[str, float] = {}
        self.load_seconds = load_seconds

    async def load(self, model: str) -> None:
        self.calls.append(("load", model))
        await asyncio.sleep(self.load_seconds)
        if model in self.fail:
            raise RuntimeError(f"failed to load '{model}': out of memory")
        self.loaded.add(model)

    async def unload(self, model: str) -> None:
        self.calls.append(("unload", model))
        await asyncio.sleep(0.01)
        self.loaded.discard(model)

    async def ready_models(self) -> set[str]:
        return set(self.loaded)

    async def last_inference(self) -> dict[str, float]:
        return dict(self.last)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def llm(precision: str, idle: float = 60.0) -> Tracked:
    n = f"m-{precision}"
    return Tracked(f"m:{precision}", ("m-preprocessing", "m-postprocessing", f"{n}-engine", f"{n}-engine-call", n,
                                      f"{n}-stream"), idle)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_first_requests_cause_one_load():
    async def scenario():
        triton = FakeTriton()
        life = Lifecycle(triton)
        life.track([llm("int8")])
        await life.sync()
        assert life.deployments["m:int8"].state == UNLOADED

        async def request():
            async with life.serving("m:int8") as d:
                assert d.state == LOADED and d.in_flight >= 1

        life.ensembles = {"m-int8"}
        await asyncio.gather(*(request() for _ in range(8)))
        loads = [m for op, m in triton.calls if op == "load"]
        assert sorted(loads) == sorted(llm("int8").models) and loads[-1] == "m-int8"   # once each, ensemble last
        assert set(life.deployments["m:int8"].load_seconds) == set(llm("int8").models)
        d = life.deployments["m:int8"]
        assert d.cold_starts == 1 and d.last_cold_start_s is not None and d.in_flight == 0

    run(scenario())


def test_a_failed_load_answers_not_servable_and_backs_off():
    async def scenario():
        triton, clock = FakeTriton(), Clock()
        triton.fail.add("m-int8-engine")
        life = Lifecycle(triton, monotonic=clock)
        life.track([llm("int8")])
        with pytest.raises(NotServable, match=r"m:int8 failed to load \(failed to load 'm-int8-engine': out of "
                                              r"memory\)") as e:
            async with life.serving("m:int8"):
                pass
        assert e.value.retry_after >= 1 and life.deployments["m:int8"].state == FAILED
        attempts = len(triton.calls)
        with pytest.raises(NotServable, match="retrying in"):      # within the back-off: no new attempt
            async with life.serving("m:int8"):
                pass
        assert len(triton.calls) == attempts
        triton.fail.clear()
        clock.now += 10                                             # past the back-off: tried again
        async with life.serving("m:int8") as d:
            assert d.state == LOADED and d.failure == ""

    run(scenario())


def test_a_load_longer_than_the_hold_limit_answers_not_servable():
    async def scenario():
        life = Lifecycle(FakeTriton(load_seconds=0.1), hold_limit=0.05)
        life.track([llm("int8")])
        with pytest.raises(NotServable, match="still loading after"):
            async with life.serving("m:int8"):
                pass
        await asyncio.sleep(1.0)                                    # the load goes on and completes
        assert life.deployments["m:int8"].state == LOADED

    run(scenario())


def test_idle_deployments_are_unloaded_but_not_busy_ones_nor_shared_models():
    async def scenario():
        triton, clock = FakeTriton(), Clock()
        life = Lifecycle(triton, clock=clock)
        life.track([llm("int8", idle=60), llm("fp16", idle=600), llm("fp32", idle=0)])
        for p in ("int8", "fp16", "fp32"):
            async with life.serving(f"m:{p}"):
                pass
        clock.now += 61
        assert await life.sweep() == ["m:int8"]                     # fp16 not idle long enough, fp32 never
        assert "m-int8" not in triton.loaded and "m-int8-engine" not in triton.loaded
        assert {"m-preprocessing", "m-postprocessing"} <= triton.loaded   # fp16 still uses them
        assert life.deployments["m:int8"].state == UNLOADED
        calls = len(triton.calls)
        assert await life.unload("m:int8") is True and len(triton.calls) == calls   # already unloaded: nothing to do

        async with life.serving("m:fp16"):                          # in flight: never unloaded
            clock.now += 601
            assert await life.sweep() == []
            assert await life.unload("m:fp16") is False
        triton.last["m-fp16-stream"] = clock.now                     # a gRPC call Triton saw just now
        assert await life.sweep() == []
        clock.now += 601
        assert await life.sweep() == ["m:fp16"]
        assert "m-fp16-engine" not in triton.loaded

    run(scenario())


def test_a_request_during_an_unload_waits_and_loads_again():
    async def scenario():
        triton = FakeTriton()
        life = Lifecycle(triton)
        life.track([llm("int8")])
        async with life.serving("m:int8"):
            pass
        unloading = asyncio.create_task(life.unload("m:int8"))
        await asyncio.sleep(0.005)                                   # the unload is under way
        async with life.serving("m:int8") as d:
            assert d.state == LOADED and "m-int8-engine" in triton.loaded
        assert await unloading is True
        assert life.deployments["m:int8"].cold_starts == 2

    run(scenario())


def test_sync_learns_what_triton_has_loaded():
    async def scenario():
        triton = FakeTriton()
        triton.loaded = set(llm("int8").models)
        life = Lifecycle(triton)
        life.track([llm("int8"), llm("fp16")])
        await life.sync()
        assert life.deployments["m:int8"].state == LOADED and life.deployments["m:fp16"].state == UNLOADED

    run(scenario())


def test_the_memory_budget_evicts_the_least_recently_used_idle_deployment():
    async def scenario():
        triton, clock = FakeTriton(), Clock()
        gib = 2**30
        life = Lifecycle(triton, clock=clock, memory_budget=2 * gib + gib // 2)
        deployments = [llm("int8"), llm("fp16"), llm("fp32")]
        for d in deployments:
            d.memory_bytes = gib
        life.track(deployments)
        for p in ("int8", "fp16"):                                  # 2 GiB of 2.5 loaded
            clock.now += 1
            async with life.serving(f"m:{p}"):
                pass
        clock.now += 1
        async with life.serving("m:int8"):                          # int8 used last: fp16 is the LRU
            pass
        async with life.serving("m:fp32") as d:
            assert d.state == LOADED
        states = {k: v.state for k, v in life.deployments.items()}
        assert states == {"m:int8": LOADED, "m:fp16": UNLOADED, "m:fp32": LOADED}
        assert "m-fp16-engine" not in triton.loaded and "m-preprocessing" in triton.loaded   # shared stays

        async with life.serving("m:int8"):                          # both others busy: nothing can go
            async with life.serving("m:fp32"):
                with pytest.raises(NotServable, match=r"memory budget of 2560 MiB is taken: loading it needs "
                                                      r"1024 MiB .* raise serve --memory-budget"):
                    async with life.serving("m:fp16"):
                        pass
        assert life.deployments["m:fp16"].state == FAILED and "m-fp16-engine" not in triton.loaded

    run(scenario())


@pytest.mark.parametrize("measured,expected", [(123 * 2**20, 2**30), (3 * 2**30, 3 * 2**30)])
def test_the_footprint_is_the_larger_of_the_build_figure_and_the_live_stubs(measured, expected):
    """A stub measured right after its load holds less than it will under load (the build's figure):
    the budget keeps the larger, so it never admits more than the machine holds once they serve."""
    async def scenario():
        life = Lifecycle(FakeTriton(), memory_budget=10 * 2**30, measure=lambda d: measured)
        d = llm("int8")
        d.build_bytes = d.memory_bytes = 2**30
        life.track([d])
        async with life.serving("m:int8"):
            pass
        assert life.deployments["m:int8"].memory_bytes == expected
        await life.unload("m:int8")
        rebuilt = llm("int8")        # a refreshed manifest with a smaller figure: the ratchet is reset
        rebuilt.build_bytes = 2**29
        life.track([rebuilt])
        assert life.deployments["m:int8"].memory_bytes == 2**29
        async with life.serving("m:int8"):
            pass
        assert life.deployments["m:int8"].memory_bytes == max(measured, 2**29)

    run(scenario())
