"""Reliability bookkeeping without servers: the supervisor's restart policy, the gateway's
backpressure bound, dead-stub healing and the answers each failure gives (the real processes are
killed in tests/integration/test_reliability.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from backends.errors import ServeError
from builder.serve.gateway.backpressure import in_flight_bound, queue_for
from builder.serve.gateway.lifecycle import LOADED, EngineDied, Lifecycle, Overloaded, Tracked
from builder.serve.gateway.stubs import python_models, running_stubs
from builder.serve.gateway.triton_client import triton_error
from builder.serve.gateway.deployments import Deployment
from builder.serve.gateway.errors import ApiError
from builder.serve.gateway.waking import WakingTriton, not_servable, unless_broken
from builder.serve.supervision import FIRST_BACKOFF, GIVE_UP, MAX_BACKOFF, STABLE_SECONDS, Piece, Supervisor, exit_cause
from tests.unit.test_lifecycle import FakeTriton


class Reloading(FakeTriton):
    async def reload(self, model: str) -> None:
        self.calls.append(("reload", model))
        await asyncio.sleep(0.01)


# -- backpressure ---------------------------------------------------------------------------------
def test_bound_is_batch_plus_queue_with_a_default_of_twice_the_batch():
    assert in_flight_bound(8, 16) == 24
    assert in_flight_bound(8, None) == 24
    assert in_flight_bound(8, 0) == 8
    assert in_flight_bound(None, None) == 24       # an old manifest without max_batch_size: 8
    assert in_flight_bound(8, -1) == 0              # no bound
    assert queue_for("m", "m:int8", 4, {"m": 2}) == 2
    assert queue_for("m", "m:int8", 4, {"m:int8": 1, "m": 2}) == 1
    assert queue_for("other", "other:fp16", None, {"m": 2}) is None


def test_requests_past_the_bound_are_refused_at_once_and_freed_slots_are_reused():
    async def scenario():
        lc = Lifecycle(FakeTriton())
        lc.track([Tracked("m:fp32", ("m",), 0.0, max_in_flight=2)])
        lc.deployments["m:fp32"].state = LOADED
        first, second = lc.serving("m:fp32"), lc.serving("m:fp32")
        await first.__aenter__()
        await second.__aenter__()
        with pytest.raises(Overloaded) as refused:
            async with lc.serving("m:fp32"):
                pass
        assert lc.deployments["m:fp32"].in_flight == 2 and lc.deployments["m:fp32"].overloaded == 1
        error = not_servable(refused.value)
        assert error.status == 429 and error.headers["Retry-After"] == "1" and error.code == "queue_full"
        async with lc.serving("m:fp32", bounded=False):   # a /v2 wake-up is not a request of its own
            pass
        await first.__aexit__(None, None, None)           # a client that went away frees its slot
        async with lc.serving("m:fp32") as d:
            assert d.in_flight == 2
        await second.__aexit__(None, None, None)
        assert lc.deployments["m:fp32"].in_flight == 0

    asyncio.run(scenario())


# -- a stub that died -----------------------------------------------------------------------------
def test_a_dead_stub_fails_requests_inside_it_and_its_model_is_reloaded():
    async def scenario():
        dead = {"m-engine"}
        api = Reloading()
        lc = Lifecycle(api, dead_stubs=lambda models: dead & set(models))
        lc.track([Tracked("m:fp32", ("m-pre", "m-engine", "m"), 0.0), Tracked("n:fp32", ("n",), 0.0)])
        for d in lc.deployments.values():
            d.state = LOADED
        async with lc.serving("m:fp32") as d:
            never = asyncio.get_running_loop().create_future()      # Triton never answers it
            inside = asyncio.create_task(unless_broken(never, d))
            await asyncio.sleep(0)
            assert await lc.heal() == ["m-engine"]
            with pytest.raises(EngineDied) as died:
                await inside
            assert never.cancelled()
        assert not_servable(died.value).status == 503
        assert ("reload", "m-engine") in api.calls and ("reload", "n") not in api.calls
        assert lc.deployments["m:fp32"].state == LOADED and lc.deployments["m:fp32"].stub_restarts == 1
        dead.clear()
        assert await lc.heal() == []
        async with lc.serving("m:fp32") as d:        # serves again, with a fresh event
            assert await unless_broken(asyncio.sleep(0, "ok"), d) == "ok"

    asyncio.run(scenario())


def test_a_stream_between_two_reads_when_its_stub_dies_fails_at_its_next_read():
    """The heal replaces the deployment's event once it has set it: a stream that was writing a
    token when the stub died must still fail its next read, not wait on the new event for good."""
    class Silent:                      # a Triton stream whose engine died: no token ever comes
        def __init__(self):
            self.reads = 0

        async def next(self):
            self.reads += 1
            if self.reads == 1:
                return {"text_output": "a"}
            await asyncio.get_running_loop().create_future()

        async def aclose(self):
            pass

    class OneDeployment:               # the catalog's two calls the waking layer makes
        d = Deployment("m:fp32", "llm", "m", "m", 2048, 8, models=("m-engine", "m"))

        def all(self):
            return [self.d]

        def owner(self, model):
            return self.d if model in self.d.models else None

    class Streaming(Reloading):
        async def open_stream(self, model, body):
            return Silent()

    async def scenario():
        dead: set[str] = set()
        api = Streaming()
        lc = Lifecycle(api, dead_stubs=lambda models: dead & set(models))
        triton = WakingTriton(api, lc, OneDeployment())
        triton.refresh()
        lc.deployments["m:fp32"].state = LOADED
        stream = await triton.open_stream("m", {})
        assert await stream.next() == {"text_output": "a"}
        dead.add("m-engine")                   # dies while the stream writes its first token
        await lc.heal()
        with pytest.raises(ApiError) as died:
            await asyncio.wait_for(stream.next(), 5)
        assert died.value.status == 503
        await stream.aclose()
        assert lc.deployments["m:fp32"].in_flight == 0

    asyncio.run(scenario())


def test_a_read_cancelled_because_its_client_left_leaves_no_task_behind():
    """Starlette cancels a hung-up stream through an anyio scope, which cancels every later await
    of the task too: the wait on the deployment's event must still be cancelled, not left on it
    until the next stub death."""
    import anyio

    async def scenario():
        d = Tracked("m:fp32", ("m",), 0.0)
        never = asyncio.get_running_loop().create_future()
        async with anyio.create_task_group() as group:
            group.start_soon(unless_broken, never, d, d.broken)
            await asyncio.sleep(0.05)
            group.cancel_scope.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert left == [] and never.cancelled()

    asyncio.run(scenario())


def test_triton_answer_for_a_dead_stub_is_a_retryable_503():
    error = triton_error(400, "in ensemble 'm', Stub process 'm-engine_0_0' is not healthy.", "m")
    assert error.status == 503 and error.headers["Retry-After"] == "5"
    assert triton_error(400, "max_tokens must be at least 1", "m").status == 400


def test_stubs_are_found_by_their_model_path(tmp_path):
    repo = tmp_path / "repo"
    for name, backend in (("m-engine", "python"), ("m", "ensemble")):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "{backend}"\n')
    assert python_models(repo, ("m-engine", "m", "absent")) == ("m-engine",)
    # a process laid out as Triton starts a stub: argv[0] the stub binary, argv[1] the model's path
    stub = tmp_path / "triton_python_backend_stub"
    stub.symlink_to(sys.executable)
    model = repo / "m-engine" / "1" / "model.py"
    model.write_text("import time\ntime.sleep(60)\n")
    assert "m-engine" not in running_stubs(repo)
    proc = subprocess.Popen([str(stub), str(model)])
    try:   # until the child has exec'd, /proc shows the parent's command line (a CI run saw that)
        deadline = time.monotonic() + 10
        while not running_stubs(repo) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running_stubs(repo) == {"m-engine"}
    finally:
        proc.kill()
        proc.wait()
    assert running_stubs(repo) == set()


# -- the supervisor -------------------------------------------------------------------------------
class FakeProcess:
    def __init__(self, clock):
        self.status: int | None = None
        self.starts = 0
        self.fail_starts = 0
        self.clock = clock

    def restart(self) -> None:
        self.starts += 1
        if self.fail_starts:
            self.fail_starts -= 1
            raise ServeError("port taken")
        self.status = None


def supervised(clock):
    proc = FakeProcess(clock)
    lines: list[str] = []
    piece = Piece("tritonserver", lambda: proc.status, proc.restart, "triton.log")
    return proc, piece, Supervisor([piece], lines.append, clock=lambda: clock[0]), lines


def test_exit_causes_name_the_signal_or_the_code():
    assert exit_cause(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_cause(3) == "exit code 3"
    assert exit_cause(None) == "not started"


def test_a_dead_piece_is_restarted_at_once_then_with_growing_back_off():
    clock = [0.0]
    proc, piece, sup, lines = supervised(clock)
    sup.check()
    assert proc.starts == 0                                  # alive: nothing to do
    proc.status = -signal.SIGKILL
    sup.check()
    assert proc.starts == 1 and "killed by SIGKILL" in lines[0] and "triton.log" in lines[0]
    proc.status = 1                                          # dies again at once
    clock[0] += 0.1
    sup.check()
    assert proc.starts == 1                                  # waits its back-off first
    clock[0] += FIRST_BACKOFF
    sup.check()
    assert proc.starts == 2
    proc.status = 1
    clock[0] += 0.1
    sup.check()
    clock[0] += FIRST_BACKOFF
    sup.check()
    assert proc.starts == 2                                  # the back-off doubled
    clock[0] += FIRST_BACKOFF
    sup.check()
    assert proc.starts == 3
    clock[0] += STABLE_SECONDS                               # stayed up: healthy again
    sup.check()
    assert piece.failures == 0 and piece.backoff == 0.0


def test_back_off_is_bounded_and_a_piece_that_keeps_dying_stops_serve():
    clock = [0.0]
    proc, piece, sup, lines = supervised(clock)
    proc.fail_starts = 100
    proc.status = -signal.SIGKILL
    with pytest.raises(ServeError, match="giving up"):
        for _ in range(1000):
            sup.check()
            assert piece.backoff <= MAX_BACKOFF
            clock[0] += 1.0
    assert proc.starts < GIVE_UP + 1
    assert any("did not come back (port taken)" in line for line in lines)


def test_status_json_of_a_deployment_says_its_bound_and_refusals():
    from builder.serve.gateway.app import status_of

    d = Tracked("m:fp32", ("m",), 0.0, max_in_flight=24, overloaded=3, stub_restarts=1)
    status = status_of(d)
    assert json.loads(json.dumps(status))["max_in_flight"] == 24
    assert status["overloaded"] == 3 and status["stub_restarts"] == 1


def test_queue_bounds_come_from_the_option_and_the_deployment_file(tmp_path):
    from backends.errors import InvalidArgumentError
    from builder.serve.serving import QueueBounds, queue_bounds

    f = tmp_path / "deployment.toml"
    f.write_text('[[models]]\nname = "m"\nmax_queue = 4\n\n[[models]]\nname = "n"\n')
    assert queue_bounds(None, f) == QueueBounds(None, {"m": 4})
    assert queue_bounds(2, None) == QueueBounds(2, {})
    f.write_text('[[models]]\nname = "m"\nmax_queue = -1\n')
    with pytest.raises(InvalidArgumentError, match="m: max_queue must be"):
        queue_bounds(None, f)
    with pytest.raises(InvalidArgumentError, match="--max-queue -2 is negative"):
        queue_bounds(-2, None)


def test_serve_refuses_a_negative_queue_or_grace_in_one_line():
    from click.testing import CliRunner

    from builder.cli.serve import serve

    for option in ("--max-queue", "--grace"):
        result = CliRunner().invoke(serve, ["-r", "repo", option, "-1"])
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
        assert "Traceback" not in result.output
