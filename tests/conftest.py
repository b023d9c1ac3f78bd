"""Shared fixtures: real servers on loopback, started once, always torn down."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from builder.serve.ports import PORT_RANGE_ENV, free_port, free_ports
from tests.support.checkpoints import make_tiny_llama
from tests.support.worker_ports import worker_port_range
from tests.support.s3 import S3Server, start_s3_server

ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_LINES = 40


def _server_logs(item) -> list[Path]:
    """Triton logs a failing test can see: its servers' log_path, and triton.log under its tmp_path."""
    logs = [Path(v.log_path) for v in item.funcargs.values() if getattr(v, "log_path", None)]
    tmp = item.funcargs.get("tmp_path")
    if tmp is not None:
        logs += sorted(Path(tmp).rglob("triton.log"))
    return [p for p in dict.fromkeys(logs) if p.is_file()]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, attach the tail of the Triton logs: a stub that died (or a health check that
    timed out) under CI load is only explained there, and CI keeps nothing else."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        for log in _server_logs(item):
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"triton log {log}", "\n".join(tail)))


# Parallel runs (`make test`'s unit and integration tests, pytest-xdist): each module runs whole on
# one worker, so its module-scoped servers start once, and the modules that use the session's
# four-precision LLM build (`llm_repository`, the longest) share one worker, so it is built once.
# (xdist's own `--dist loadgroup` cannot be used: it marks groups in the node id, which pytest 9
# ignores.)
LLM_REPOSITORY_MODULES = {"test_cpu_runtime", "test_llm_triton", "test_openai_api", "test_prompt_lookup"}


@pytest.hookimpl(optionalhook=True)     # pytest without xdist (or -p no:xdist) runs as before
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":   # an explicit --dist (each, loadfile, ...) is the user's choice
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "llm_repository" if Path(module).stem in LLM_REPOSITORY_MODULES else module

    return ByModule(config, log)


def pytest_configure(config):
    """Each xdist worker picks its servers' ports from its own range (inherited by the serves and
    Tritons it starts): with the kernel picking, a port one worker found free was sometimes bound
    by the other's servers before its own server bound it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or os.environ.get(PORT_RANGE_ENV):
        return
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    ports = worker_port_range(worker, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), ephemeral_low)
    if ports:
        os.environ[PORT_RANGE_ENV] = ports


def pytest_itemcollected(item):
    """Keeps LLM_REPOSITORY_MODULES true: a module that starts using the shared build must join it."""
    if "llm_repository" in getattr(item, "fixturenames", ()) and item.path.stem not in LLM_REPOSITORY_MODULES:
        raise pytest.UsageError(f"{item.path.name} uses llm_repository: add it to LLM_REPOSITORY_MODULES "
                                "in tests/conftest.py (one worker builds it)")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where servers keep their assembled backend directory."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One credential-checking S3 store for the session; always torn down."""
    server = start_s3_server(free_port(), auth=True, log=tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{time.monotonic_ns() % 10**8}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """boto3's standard chain sees the test store's credentials (env vars), and nothing else."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    return s3_server


# -- LLM deployments: one build and one Triton for the whole session ----------------------------
LLM_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny-llama"
LLM_CONTEXT = 2048
LLM_PRECISIONS = ["fp32", "fp16", "int8", "fp8"]


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory) -> Path:
    """Converted checkpoints and fp32 exports, shared by every build of the session."""
    return tmp_path_factory.mktemp("build-cache")


@pytest.fixture(scope="session")
def smollm2(build_cache):
    """The embedded default model, converted from its GGUF into a Hugging Face directory."""
    from builder.build.sources.checkpoint import resolve

    return resolve("default", "llm", build_cache)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2.hf_dir)


def llm_specs(tiny_llama: Path) -> list:
    """The session's LLM repository: every precision of the default model and the tiny Llama. Only
    int8's memory is measured (test_cpu_runtime checks it; the load test costs ~20 s per precision)."""
    from builder.build.deployment import DeploymentSpec

    others = [p for p in LLM_PRECISIONS if p != "int8"]
    return [DeploymentSpec(LLM_NAME, precisions=["int8"], context_size=LLM_CONTEXT, max_batch_size=4),
            DeploymentSpec(LLM_NAME, precisions=others, context_size=LLM_CONTEXT, max_batch_size=4, memory_test=False),
            DeploymentSpec(TINY_NAME, source=str(tiny_llama), precisions=["fp32"], context_size=256,
                           max_batch_size=2)]


@pytest.fixture(scope="session")
def llm_repository(tmp_path_factory, build_cache, tiny_llama) -> Path:
    from builder.build.pipeline import BuildOptions, build

    out = tmp_path_factory.mktemp("llm") / "repository"
    build(llm_specs(tiny_llama), BuildOptions(output=out, cache_dir=build_cache, echo=lambda _: None))
    return out


@pytest.fixture(scope="session")
def llm_server(llm_repository, cache_dir, tmp_path_factory):
    from builder.serve.triton_server import Ports, TritonServer

    http, grpc, metrics = free_ports(3)
    log = tmp_path_factory.mktemp("triton-llm") / "triton.log"
    with TritonServer(llm_repository, Ports(http, grpc, metrics), cache_dir=cache_dir, log_path=log) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory, build_cache, tiny_llama) -> Path:
    """A small LLM repository (the random tiny Llama at fp32) for tests that start their own server."""
    from builder.build.deployment import DeploymentSpec
    from builder.build.pipeline import BuildOptions, build

    out = tmp_path_factory.mktemp("tiny") / "repository"
    build([DeploymentSpec(TINY_NAME, source=str(tiny_llama), precisions=["fp32"], context_size=256, max_batch_size=2)],
          BuildOptions(output=out, cache_dir=build_cache, echo=lambda _: None))
    return out
