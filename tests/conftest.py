"""Shared fixtures: real servers on loopback, started once, always torn down."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from netutil import free_port, free_ports  # noqa: F401  (tests import them from here)

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


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where servers keep their assembled backend directory."""
    return tmp_path_factory.mktemp("cache")


# --- object storage: a real S3-compatible server (moto's server mode) on loopback -------------

import json as _json  # noqa: E402
import os as _os  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import sys as _sys  # noqa: E402
import time as _time  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402

MOTO_SERVER = Path(_sys.executable).parent / "moto_server"


@_dataclass
class S3Server:
    """A moto_server subprocess; `kill()` it to simulate the store dying mid-transfer."""

    port: int
    process: _subprocess.Popen
    access_key: str = "testing"
    secret_key: str = "testing-secret"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **overrides: str) -> dict[str, str]:
        """Credentials and region for boto3's standard chain, isolated from any ~/.aws config."""
        env = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
               "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
        return {**env, **overrides}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start_s3_server(port: int, *, auth: bool = False, log: Path | None = None) -> S3Server:
    """Start moto_server on 127.0.0.1:port. With auth, credentials are checked like AWS does:
    the first three requests create an IAM user with an access key, every later one must sign with it."""
    env = dict(_os.environ)
    env.pop("AWS_ENDPOINT_URL", None)
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    out = open(log, "ab") if log else _subprocess.DEVNULL
    proc = _subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=out,
                             stderr=_subprocess.STDOUT, stdin=_subprocess.DEVNULL)
    server = S3Server(port, proc)
    deadline = _time.monotonic() + 30
    while True:  # a TCP connect, not a request: requests count toward INITIAL_NO_AUTH_ACTION_COUNT
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if _time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto_server did not start listening within 30 s")
            _time.sleep(0.1)
    if auth:
        import boto3

        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="ci")
        iam.put_user_policy(UserName="ci", PolicyName="all", PolicyDocument=_json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="ci")["AccessKey"]
        server.access_key, server.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
    return server


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
    name = f"{name}-{_time.monotonic_ns() % 10**8}"
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
    from builder.sources.checkpoint import resolve

    return resolve("default", "llm", build_cache)


def make_tiny_llama(target: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer: exactness on a second checkpoint, in seconds."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(target, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir) / name, target / name)
    return target


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2.hf_dir)


@pytest.fixture(scope="session")
def llm_repository(tmp_path_factory, build_cache, tiny_llama) -> Path:
    from builder.build import BuildOptions, build
    from builder.deployment import DeploymentSpec

    out = tmp_path_factory.mktemp("llm") / "repository"
    specs = [DeploymentSpec(LLM_NAME, precisions=LLM_PRECISIONS, context_size=LLM_CONTEXT, max_batch_size=4),
             DeploymentSpec(TINY_NAME, source=str(tiny_llama), precisions=["fp32"], context_size=256,
                            max_batch_size=2)]
    build(specs, BuildOptions(output=out, cache_dir=build_cache, echo=lambda _: None))
    return out


@pytest.fixture(scope="session")
def llm_server(llm_repository, cache_dir, tmp_path_factory):
    from builder.triton_server import Ports, TritonServer

    http, grpc, metrics = free_ports(3)
    log = tmp_path_factory.mktemp("triton-llm") / "triton.log"
    with TritonServer(llm_repository, Ports(http, grpc, metrics), cache_dir=cache_dir, log_path=log) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory, build_cache, tiny_llama) -> Path:
    """A small LLM repository (the random tiny Llama at fp32) for tests that start their own server."""
    from builder.build import BuildOptions, build
    from builder.deployment import DeploymentSpec

    out = tmp_path_factory.mktemp("tiny") / "repository"
    build([DeploymentSpec(TINY_NAME, source=str(tiny_llama), precisions=["fp32"], context_size=256, max_batch_size=2)],
          BuildOptions(output=out, cache_dir=build_cache, echo=lambda _: None))
    return out
