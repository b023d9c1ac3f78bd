"""`serverless-triton serve` as users run it (nginx, the OpenAI gateway, Triton) in a subprocess,
for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from builder.serve.ports import free_ports
from builder.serve.proxy import AccessRules, Proxy, ProxyLayout, StateDir
from builder.serve.serving import gateway_for

CLI = [sys.executable, "-m", "builder"]
GENERATE = {"text_input": "Hello", "max_tokens": 4}


def stop_serve(process: subprocess.Popen) -> None:
    """SIGTERM to a serve started in its own session (it stops what it started), SIGKILL after 60 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Serve:
    """`serverless-triton serve` in a subprocess (nginx, gateway, Triton); always stopped."""

    def __init__(self, repository: Path, tmp: Path, *options: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.state = tmp / "state"
        self.output = tmp / "serve.out"
        cmd = CLI + ["serve", "-r", str(repository), "--http-port", str(self.http), "--grpc-port", str(self.grpc),
                     "--metrics-port", str(self.metrics), "--public-address", "127.0.0.1", "--state-dir",
                     str(self.state), "--log-file", str(tmp / "triton.log"), *options]
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while b"Ctrl-C to stop." not in self.output.read_bytes():
            assert self.process.poll() is None and time.monotonic() < deadline, self.output.read_text()
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def api_keys(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(CLI + ["api-keys", *args, "--state-dir", str(self.state)], capture_output=True,
                              text=True, timeout=60)

    def create_key(self, name: str, *options: str) -> str:
        result = self.api_keys("create", name, *options)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def generate(self, model: str, key: str | None, source: str | None = None, **body) -> httpx.Response:
        """Triton's /v2 generate through nginx (from `source`, a loopback address, when given)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = httpx.HTTPTransport(local_address=source) if source else None
        with httpx.Client(transport=transport, timeout=300) as c:
            return c.post(f"{self.url}/v2/models/{model}/generate", json=body or GENERATE, headers=headers)

    def grpc_infer(self, model: str, key: str | None) -> str:
        """'ok' or the gRPC status code name of a plain infer through nginx."""
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"Hello"]], dtype=object))
        max_tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
        max_tokens.set_data_from_numpy(np.array([[4]], dtype=np.int32))
        with grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc}") as c:
            try:
                c.infer(model, [text, max_tokens], headers={"authorization": f"Bearer {key}"} if key else None)
                return "ok"
            except InferenceServerException as e:
                return str(e.status()).rsplit(".", 1)[-1]

    def stop(self) -> None:
        stop_serve(self.process)

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Front:
    """What `serve` puts in front of a running Triton: the OpenAI gateway and nginx (keys on,
    allowed IPs open), built from the same pieces serve uses; always stopped. `url` is nginx's
    public HTTP address, `gateway_url` the gateway's own (for its internal /auth)."""

    def __init__(self, triton, repository: Path, state: Path, max_body_bytes: int = 32 << 20, public: bool = False):
        http, grpc, gateway = free_ports(3)
        layout = ProxyLayout(http, grpc, triton.http_url, triton.grpc_url, ("127.0.0.1",),
                             gateway=f"127.0.0.1:{gateway}", keys_required=not public, max_body_bytes=max_body_bytes)
        self.proxy = Proxy(StateDir(Path(state)), layout, AccessRules())
        self.gateway = gateway_for(self.proxy, triton, repository)
        self.log = self.gateway.log_path
        self.gateway.start()
        try:
            self.proxy.start()
        except BaseException:
            self.gateway.stop()
            raise
        self.url = f"http://127.0.0.1:{http}"
        self.grpc_url = f"127.0.0.1:{grpc}"
        self.gateway_url = f"http://{self.gateway.address}"

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.proxy.stop()
        self.gateway.stop()
