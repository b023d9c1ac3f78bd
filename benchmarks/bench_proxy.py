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
from echo_models import ECHO_CONFIG, ECHO_MODEL
from netutil import free_ports

ROOT = Path(__file__).resolve().parent.parent
REQUESTS_PER_ROUND = 400
CLIENTS = 8
ROUNDS = 6

# echo: the model costs next to nothing and client, nginx and Triton share the CPU: the proxy's
#       own cost shows in full (worst case).
# wait: the model takes 2 ms without using the CPU, as a GPU-bound model does (one LLM token step
#       takes longer than that): what the proxy costs a deployment limited by its model.
TEXTS = {"echo": "hello world", "wait": "wait world"}


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """{"direct": (http, grpc), "nginx": (http, grpc)} ports of one running serve, and its state dir."""
    tmp = tmp_path_factory.mktemp("bench_proxy")
    (tmp / "repo" / "echo" / "1").mkdir(parents=True)
    (tmp / "repo" / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (tmp / "repo" / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    http_port, grpc_port, metrics_port = free_ports(3)
    out = tmp / "serve.out"
    cmd = [sys.executable, "-c", "from builder.serve_cli import serve; serve()", "--repository", str(tmp / "repo"),
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--public-address", "127.0.0.1", "--allowed-ip", "127.0.0.1", "--state-dir", str(tmp / "state")]
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
    def __init__(self, port: int, text: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.body = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})
        self.expected = text.upper().encode()

    def __call__(self) -> None:
        self.conn.request("POST", "/v2/models/echo/infer", self.body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        assert response.status == 200 and self.expected in response.read()

    def close(self) -> None:
        self.conn.close()


class GrpcClient:
    def __init__(self, port: int, text: str):
        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        self.inputs = [grpcclient.InferInput("text", [1], "BYTES")]
        self.inputs[0].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        self.expected = text.upper().encode()

    def __call__(self) -> None:
        assert self.client.infer("echo", self.inputs).as_numpy("text")[0] == self.expected

    def close(self) -> None:
        self.client.close()


def run_round(clients: list) -> tuple[float, list[float]]:
    """REQUESTS_PER_ROUND calls spread over the clients; (wall seconds, per-call latencies)."""
    per_client = REQUESTS_PER_ROUND // len(clients)

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


def figures(walls: list[float], latencies: list[float]) -> dict:
    return {
        "requests_per_s": round(REQUESTS_PER_ROUND * len(walls) / sum(walls), 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 3),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 3),
    }


def nginx_cpu_seconds(state: Path) -> float:
    """user+system CPU of nginx's worker processes so far (the master only supervises)."""
    master, total = int((state / "nginx.pid").read_text()), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == master:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@pytest.mark.parametrize("workload", ["echo", "wait"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_nginx_against_direct(benchmark, endpoints, protocol, workload, capsys):
    """Timed: rounds through nginx. Between them (pytest-benchmark's untimed setup), the same
    rounds straight to Triton, so both paths see the same machine load on a shared 2-core box."""
    make = HttpClient if protocol == "http" else GrpcClient
    index = 0 if protocol == "http" else 1
    clients = {path: [make(endpoints[path][index], TEXTS[workload]) for _ in range(CLIENTS)]
               for path in ("direct", "nginx")}
    walls = {"direct": [], "nginx": []}
    latencies = {"direct": [], "nginx": []}
    cpu = [0.0]

    def measure(path: str) -> None:
        before = nginx_cpu_seconds(endpoints["state"]) if path == "nginx" else 0.0
        wall, lat = run_round(clients[path])
        if path == "nginx":
            cpu[0] += nginx_cpu_seconds(endpoints["state"]) - before
        walls[path].append(wall)
        latencies[path].extend(lat)

    try:
        for pool in clients.values():  # connect and warm up outside the measurement
            run_round(pool)
        benchmark.pedantic(measure, args=("nginx",), setup=lambda: measure("direct"), rounds=ROUNDS, iterations=1)
    finally:
        for pool in clients.values():
            for call in pool:
                call.close()
    result = {path: figures(walls[path], latencies[path]) for path in walls}
    loss = 100 * (1 - result["nginx"]["requests_per_s"] / result["direct"]["requests_per_s"])
    cpu_us = 1e6 * cpu[0] / (REQUESTS_PER_ROUND * ROUNDS)
    benchmark.extra_info.update(direct=result["direct"], nginx=result["nginx"], throughput_loss_pct=round(loss, 2),
                                nginx_cpu_us_per_request=round(cpu_us, 1), clients=CLIENTS,
                                requests_per_path=REQUESTS_PER_ROUND * ROUNDS)
    with capsys.disabled():
        for path, f in result.items():
            print(f"\n{protocol:<4} {workload:<4} {path:<6} {f['requests_per_s']:>7} req/s  "
                  f"p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms", end="")
        print(f"  -> throughput loss {loss:+.1f}%, nginx CPU {cpu_us:.0f} us/request")
