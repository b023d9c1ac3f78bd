"""Scale to zero through the README's `serve`: an idle deployment is unloaded (its Python stubs
gone), the next request on /v1 or /v2 wakes it and is answered, concurrent first requests cause one
load, and `status`, `wake` and `unload` drive it from another shell."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import TINY_NAME
from tritonclient.utils import InferenceServerException

from backends.errors import InvalidArgumentError
from builder.serve.control import act
from tests.support.llm_client import grpc_infer, grpc_stream
from tests.support.serve import CLI, Serve

pytestmark = pytest.mark.slow
MODEL = f"{TINY_NAME}:fp32"
TRITON_MODEL = f"{TINY_NAME}-fp32"
IDLE = 3


def stubs_of(repository: Path, model: str) -> list[int]:
    """Python-backend stub processes serving one Triton model of one repository."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"triton_python_backend_stub") and \
                any(f"{Path(repository).resolve()}/{model}/1/model.py".encode() in a for a in cmdline):
            found.append(int(pid))
    return found


@pytest.fixture(scope="module")
def deployment(tiny_repository, tmp_path_factory):
    # a queue wide enough for the 8 concurrent first requests (the tiny deployment's batch is small)
    with Serve(tiny_repository, tmp_path_factory.mktemp("serve-zero"), "--public", "--idle-timeout", str(IDLE),
               "--max-queue", "16") as dep:
        yield dep


def states(dep: Serve) -> dict[str, dict]:
    out = subprocess.run(CLI + ["status", "--json", "--state-dir", str(dep.state)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return {d["model"]: d for d in json.loads(out.stdout)["deployments"]}


def wait_state(dep: Serve, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (current := states(dep)[MODEL])["state"] != state:
        assert time.monotonic() < deadline, current
        time.sleep(0.5)
    return current


def test_idle_unload_frees_the_stubs_and_a_request_wakes_it(deployment, tiny_repository):
    # a request first: on a busy machine serve's start alone can outlast the idle timeout
    assert deployment.generate(TRITON_MODEL, None).status_code == 200
    assert stubs_of(tiny_repository, f"{TRITON_MODEL}-engine")
    wait_state(deployment, "unloaded", timeout=IDLE + 20)
    deadline = time.monotonic() + 10
    while stubs_of(tiny_repository, f"{TRITON_MODEL}-engine") or stubs_of(tiny_repository, f"{TRITON_MODEL}-stream"):
        assert time.monotonic() < deadline, "the unloaded deployment's stubs are still running"
        time.sleep(0.2)
    answer = deployment.openai("unused").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens >= 1                    # woken, then answered
    d = states(deployment)[MODEL]
    assert d["state"] == "loaded" and d["cold_starts"] >= 1 and d["last_cold_start_s"] > 0


def test_a_v2_request_wakes_it_and_eight_first_requests_share_one_load(deployment, tiny_repository):
    unloaded = subprocess.run(CLI + ["unload", MODEL, "--state-dir", str(deployment.state)], capture_output=True,
                              text=True, timeout=60)
    assert unloaded.returncode == 0 and unloaded.stdout.strip() == f"{MODEL}: unloaded", unloaded.stderr
    assert not stubs_of(tiny_repository, f"{TRITON_MODEL}-engine")
    before = states(deployment)[MODEL]["cold_starts"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: deployment.generate(TRITON_MODEL, None), range(8)))
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert all(a.json()["text_output"] == answers[0].json()["text_output"] for a in answers)   # greedy, same prompt
    assert states(deployment)[MODEL]["cold_starts"] == before + 1


def test_wake_and_unload_commands(deployment):
    run = lambda *a: subprocess.run(CLI + [*a, "--state-dir", str(deployment.state)], capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    assert run("unload", MODEL).returncode == 0
    woke = run("wake", MODEL)
    assert woke.returncode == 0 and woke.stdout.startswith(f"{MODEL}: loaded (")
    table = run("status")
    assert table.returncode == 0 and MODEL in table.stdout and "loaded" in table.stdout
    unknown = run("wake", "nope:int8")
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr and "Traceback" not in unknown.stderr
    elsewhere = subprocess.run(CLI + ["status", "--http-port", "1"], capture_output=True, text=True, timeout=30)
    assert elsewhere.returncode == 1 and elsewhere.stderr.startswith("Error: ")


def test_an_unload_never_cuts_a_request_in_flight(deployment):
    """A stream holds its deployment: `unload` is refused while it runs, and the stream ends whole."""
    client = deployment.openai("unused")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
                                            max_tokens=200, temperature=0, stream_options={"include_usage": True})
    chunks = iter(stream)
    first = next(chunks)                                          # the stream is open and in flight
    with pytest.raises(InvalidArgumentError, match="has requests in flight"):
        act(deployment.state, MODEL, "unload")                    # at once (the CLI's start is too slow)
    rest = list(chunks)
    reasons = [c.choices[0].finish_reason for c in [first, *rest] if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"] and rest[-1].usage.completion_tokens == 200
    assert states(deployment)[MODEL]["state"] == "loaded"


def test_grpc_calls_wake_it_unary_and_streamed(deployment, tiny_repository):
    """gRPC through nginx: the gateway's relay wakes the deployment a call names (one cold start
    each time), then Triton answers as if it had always been loaded."""
    grpc = f"127.0.0.1:{deployment.grpc}"
    for call in (lambda: grpc_infer(grpc, TRITON_MODEL, text_input="Hello", max_tokens=4)["text_output"],
                 lambda: "".join(c["text_output"] for c in grpc_stream(grpc, f"{TRITON_MODEL}-stream",
                                                                       text_input="Hello", max_tokens=4))):
        act(deployment.state, MODEL, "unload")
        assert not stubs_of(tiny_repository, f"{TRITON_MODEL}-engine")
        before = states(deployment)[MODEL]["cold_starts"]
        assert call() == http_infer_text(deployment)
        assert states(deployment)[MODEL]["cold_starts"] == before + 1


def http_infer_text(dep: Serve) -> str:
    return dep.generate(TRITON_MODEL, None, text_input="Hello", max_tokens=4).json()["text_output"]


@pytest.mark.alone   # "at once" (< 2 s) against another load attempt: timed with the machine to itself
def test_a_failed_load_answers_503_and_unavailable_then_backs_off(tiny_repository, tmp_path):
    """A deployment whose engine cannot load: /v1 gets 503 with the reason and Retry-After, /v2 503,
    gRPC UNAVAILABLE naming the deployment (never Triton's bare "unknown model"), and the back-off
    answers at once instead of retrying the load."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo, symlinks=True)
    (tmp_path / "serve").mkdir()
    with Serve(repo, tmp_path / "serve", "--public", "--idle-timeout", "0") as dep:
        act(dep.state, MODEL, "unload")
        for xml in (repo / f"{TRITON_MODEL}-engine").rglob("*.xml"):
            xml.write_text("<not an openvino model")
        client = dep.openai("unused")
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert refused.value.status_code == 503 and int(refused.value.response.headers["retry-after"]) >= 1
        assert "could not be loaded" in refused.value.message or "load" in refused.value.message
        assert states(dep)[MODEL]["state"] == "failed"
        start = time.monotonic()
        assert dep.generate(TRITON_MODEL, None).status_code == 503
        with pytest.raises(InferenceServerException) as unavailable:
            grpc_infer(f"127.0.0.1:{dep.grpc}", TRITON_MODEL, text_input="Hello", max_tokens=4)
        assert time.monotonic() - start < 2, "backing off: answered at once, not after another load"
        assert unavailable.value.status() == "StatusCode.UNAVAILABLE"
        assert MODEL in unavailable.value.message() and "retry in" in unavailable.value.message()
