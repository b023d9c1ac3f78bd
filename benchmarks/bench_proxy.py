"""What nginx in front of Triton costs: requests/s and p50/p99 latency, proxied vs direct.

One `serve` (subprocess, allow list 127.0.0.1) on a one-model Python-backend repository; the
direct path is Triton's own loopback port (from the state dir's proxy.json), the proxied path
nginx's public port, so both hit the same Triton in the same run. Each round sends a fixed number
of small requests from a bounded pool of concurrent clients, each with one persistent connection;
direct and proxied rounds alternate. Goal: under 5% throughput loss. Nothing asserts timings.

    .venv/bin/python -m pytest benchmarks/bench_proxy.py --benchmark-only -q
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from builder.paths import cache_root
from builder.serve.ports import free_ports
from builder.serve.processes import children
from tests.support.machine import cpu_description
from tests.support.echo_models import ECHO_CONFIG, ECHO_MODEL, write_python_model

ROOT = Path(__file__).resolve().parent.parent
REQUESTS_PER_ROUND = 400
CLIENTS = 8
ROUNDS = 6

# echo: the model costs next to nothing and client, nginx and Triton share the CPU: the proxy's
#       own cost shows in full (worst case).
# wait: the model takes 2 ms without using the CPU, as a GPU-bound model does (one LLM token step
#       takes longer than that): what the proxy costs a deployment limited by its model.
# embedding: a real deployment, the default embedding model at int8 on this CPU, 16 texts a
#       request (bench_embedding's load): what the proxy costs what this product serves.
TEXTS = {"echo": "hello world", "wait": "wait world"}
EMBEDDING = "all-minilm-l6-v2"
EMBEDDING_MODEL = f"{EMBEDDING}-int8"
EMBEDDING_TEXTS = [f"Sentence number {i} about serving models behind a proxy." for i in range(16)]
REQUESTS = {"echo": REQUESTS_PER_ROUND, "wait": REQUESTS_PER_ROUND, "embedding": 96}
ROUNDS_OF = {"echo": ROUNDS, "wait": ROUNDS, "embedding": 10}   # embedding rounds are short and noisy


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """{"direct": (http, grpc), "nginx": (http, grpc)} ports of one running serve, and its state dir."""
    from builder.build.deployment import DeploymentSpec
    from builder.build.pipeline import BuildOptions, build

    tmp = tmp_path_factory.mktemp("bench_proxy")
    build([DeploymentSpec(EMBEDDING, kind="embedding", precisions=["int8"])],
          BuildOptions(output=tmp / "repo", cache_dir=cache_root(),
                       echo=lambda _: None))
    write_python_model(tmp / "repo", "echo", ECHO_CONFIG, ECHO_MODEL)
    http_port, grpc_port, metrics_port = free_ports(3)
    out = tmp / "serve.out"
    cmd = [sys.executable, "-c", "from builder.cli.serve import serve; serve()", "--repository", str(tmp / "repo"),
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--public-address", "127.0.0.1", "--allowed-ip", "127.0.0.1", "--state-dir", str(tmp / "state"),
           "--public", "--idle-timeout", "0"]   # the allowed-IP front alone (bench_openai.py: /v1 with keys)
    with open(out, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while b"Ctrl-C to stop." not in out.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        layout = json.loads((tmp / "state" / "proxy.json").read_text())
        direct = tuple(int(layout[k].rsplit(":", 1)[1]) for k in ("triton_http", "triton_grpc"))
        yield {"direct": direct, "nginx": (http_port, grpc_port), "state": tmp / "state"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


class HttpClient:
    def __init__(self, port: int, workload: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        if workload == "embedding":
            self.path = f"/v2/models/{EMBEDDING_MODEL}/infer"
            self.body = json.dumps({
                "inputs": [{"name": "text", "shape": [len(EMBEDDING_TEXTS), 1], "datatype": "BYTES",
                            "data": EMBEDDING_TEXTS}],
                "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}]})
            self.expected = b'"embedding"'
        else:
            self.path = "/v2/models/echo/infer"
            text = TEXTS[workload]
            self.body = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})
            self.expected = text.upper().encode()

    def __call__(self) -> None:
        self.conn.request("POST", self.path, self.body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        assert response.status == 200 and self.expected in response.read()

    def close(self) -> None:
        self.conn.close()


class GrpcClient:
    def __init__(self, port: int, workload: str):
        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        if workload == "embedding":
            texts = np.array([[t.encode()] for t in EMBEDDING_TEXTS], dtype=np.object_)
            self.model, self.output, self.expected = EMBEDDING_MODEL, "embedding", None
        else:
            texts = np.array([TEXTS[workload].encode()], dtype=np.object_)
            self.model, self.output, self.expected = "echo", "text", TEXTS[workload].upper().encode()
        self.inputs = [grpcclient.InferInput("text", list(texts.shape), "BYTES")]
        self.inputs[0].set_data_from_numpy(texts)

    def __call__(self) -> None:
        out = self.client.infer(self.model, self.inputs).as_numpy(self.output)
        assert out.shape[0] == len(EMBEDDING_TEXTS) if self.expected is None else out[0] == self.expected

    def close(self) -> None:
        self.client.close()


def run_round(clients: list, requests: int) -> tuple[float, list[float]]:
    """`requests` calls spread over the clients; (wall seconds, per-call latencies)."""
    per_client = requests // len(clients)

    def drive(call) -> list[float]:
        latencies = []
        for _ in range(per_client):
            start = time.perf_counter()
            call()
            latencies.append(time.perf_counter() - start)
        return latencies

    with ThreadPoolExecutor(len(clients)) as pool:
        start = time.perf_counter()
        results = list(pool.map(drive, clients))
        wall = time.perf_counter() - start
    return wall, [x for r in results for x in r]


def figures(walls: list[float], latencies: list[float], requests: int) -> dict:
    return {
        "requests_per_s": round(requests * len(walls) / sum(walls), 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 3),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 3),
    }


def nginx_cpu_seconds(state: Path) -> float:
    """user+system CPU of nginx's worker processes so far (the master only supervises)."""
    workers = children(int((state / "nginx.pid").read_text()))
    return sum(int(f[11]) + int(f[12]) for f in workers.values()) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("workload", ["echo", "wait", "embedding"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_nginx_against_direct(benchmark, endpoints, protocol, workload, capsys):
    """Timed: rounds through nginx. Between them (pytest-benchmark's untimed setup), the same
    rounds straight to Triton, so both paths see the same machine load on a shared 2-core box."""
    make = HttpClient if protocol == "http" else GrpcClient
    index = 0 if protocol == "http" else 1
    requests = REQUESTS[workload]
    clients = {path: [make(endpoints[path][index], workload) for _ in range(CLIENTS)]
               for path in ("direct", "nginx")}
    walls = {"direct": [], "nginx": []}
    latencies = {"direct": [], "nginx": []}
    cpu = [0.0]

    def measure(path: str) -> None:
        before = nginx_cpu_seconds(endpoints["state"]) if path == "nginx" else 0.0
        wall, lat = run_round(clients[path], requests)
        if path == "nginx":
            cpu[0] += nginx_cpu_seconds(endpoints["state"]) - before
        walls[path].append(wall)
        latencies[path].extend(lat)

    try:
        for pool in clients.values():  # connect and warm up outside the measurement
            run_round(pool, requests)
        benchmark.pedantic(measure, args=("nginx",), setup=lambda: measure("direct"), rounds=ROUNDS_OF[workload],
                           iterations=1)
    finally:
        for pool in clients.values():
            for call in pool:
                call.close()
    result = {path: figures(walls[path], latencies[path], requests) for path in walls}
    loss = 100 * (1 - result["nginx"]["requests_per_s"] / result["direct"]["requests_per_s"])
    cpu_us = 1e6 * cpu[0] / (requests * ROUNDS_OF[workload])
    # What nginx's CPU would cost a CPU-bound deployment at the direct rate on these cores: a
    # noise-free estimate of the loss, next to the measured one.
    cpu_share = 100 * cpu_us * 1e-6 * result["direct"]["requests_per_s"] / (os.cpu_count() or 1)
    benchmark.extra_info.update(direct=result["direct"], nginx=result["nginx"], throughput_loss_pct=round(loss, 2),
                                nginx_cpu_us_per_request=round(cpu_us, 1), nginx_cpu_share_pct=round(cpu_share, 2),
                                clients=CLIENTS, requests_per_path=requests * ROUNDS_OF[workload])
    with capsys.disabled():
        for path, f in result.items():
            print(f"\n{protocol:<4} {workload:<9} {path:<6} {f['requests_per_s']:>7} req/s  "
                  f"p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms", end="")
        print(f"  -> throughput loss {loss:+.1f}%, nginx CPU {cpu_us:.0f} us/request "
              f"({cpu_share:.1f}% of the cores at the direct rate; CPU: {cpu_description()})")
