"""nginx in front of Triton, end to end: real `serve` (subprocess), real nginx, real Triton.

One serve for the module, on a tiny Python-backend repository written here: `echo` (uppercases a
BYTES tensor; "slow:" texts take 1 s) and `stream` (decoupled: one response per word; "slow:" texts
0.3 s apart). Clients on other loopback addresses (127.0.0.2, 127.0.0.3) play other hosts: HTTP
binds its source address; gRPC goes through a relay whose upstream socket is bound to the address,
so tritonclient (which cannot bind one) is the client on both sides.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner
from conftest import ROOT
from tritonclient.utils import InferenceServerException

from backends.errors import ProxyError
from builder.serve.ports import free_ports
from builder.serve.proxy import Proxy, ProxyLayout, StateDir, install_config, running_master
from tests.support.echo_models import ECHO_CONFIG, ECHO_MODEL, write_python_model

pytestmark = pytest.mark.slow

REFUSED_TEXT = b"forbidden: this address is not in the deployment's allowed IPs\n"

# -- a tiny model repository ---------------------------------------------------------------------

STREAM_CONFIG = """
name: "stream"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }]
output [{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }]
instance_group [{ kind: KIND_CPU count: 1 }]
"""

STREAM_MODEL = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            text = bytes(pb_utils.get_input_tensor_by_name(request, "text").as_numpy().flat[0])
            delay = 0.3 if text.startswith(b"slow:") else 0.0
            sender = request.get_response_sender()
            for word in text.split():
                time.sleep(delay)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("text", np.array([word], dtype=np.object_))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def write_test_repository(root: Path) -> Path:
    for name, config, model in (("echo", ECHO_CONFIG, ECHO_MODEL), ("stream", STREAM_CONFIG, STREAM_MODEL)):
        write_python_model(root, name, config, model)
    return root


# -- clients ---------------------------------------------------------------------------------------

class SourceRelay:
    """TCP relay on 127.0.0.1:<port> whose upstream connections come from `source`."""

    def __init__(self, target_port: int, source: str):
        self.target, self.source = ("127.0.0.1", target_port), source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, source_address=(self.source, 0))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def http_request(port: int, method: str, path: str, body: dict | None = None, source: str = "127.0.0.1",
                 headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_infer(port: int, text: str, **kw) -> tuple[int, bytes]:
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
    return http_request(port, "POST", "/v2/models/echo/infer", body, **kw)


def answer(data: bytes) -> str:
    return json.loads(data)["outputs"][0]["data"][0]


def _text_input(text: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return inp


def grpc_infer(url: str, text: str, headers: dict | None = None) -> str:
    client = grpcclient.InferenceServerClient(url)
    try:
        return client.infer("echo", [_text_input(text)], headers=headers).as_numpy("text")[0].decode()
    finally:
        client.close()


def grpc_stream(url: str, text: str, timeout: float = 30) -> list[str]:
    """Every streamed word, until Triton's final flag; raises the stream's error."""
    client, responses = grpcclient.InferenceServerClient(url), queue.Queue()
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            client.async_stream_infer("stream", [_text_input(text)], enable_empty_final_response=True)
        except InferenceServerException:
            pass  # the stream already failed (a refusal can beat the request); its error is queued
        words = []
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error
            response = result.get_response()
            if response.outputs:
                words.append(result.as_numpy("text")[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                return words
    finally:
        client.stop_stream()
        client.close()


def grpc_status_from(source: str, port: int) -> tuple[str, str]:
    """(grpc-status, grpc-message) of a raw HTTP/2 ServerLive call made by curl from `source`.

    The call carries no message, so Triton answers it with an error of its own (13, "Unable to
    parse request"). With a message, a refusal would end the stream before nginx read the DATA
    frame, and nginx would follow its answer with RST_STREAM(NO_ERROR), as HTTP/2 allows; gRPC
    clients take that in stride, curl 7.88 sometimes reports it as exit 92 instead of the headers.
    """
    out = subprocess.run(
        ["curl", "-s", "--http2-prior-knowledge", "--interface", source, "-X", "POST", "-D", "-", "-o", "/dev/null",
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ServerLive"],
        capture_output=True, timeout=30, check=True).stdout.decode()
    headers = dict(line.split(":", 1) for line in out.splitlines() if line.startswith("grpc-"))
    return headers["grpc-status"].strip(), headers.get("grpc-message", "").strip()


# -- the deployment ----------------------------------------------------------------------------------

def cli() -> click.Group:
    from builder.cli import main

    return main


class Deployment:
    """A running `serve` subprocess and the ways to reach it."""

    def __init__(self, tmp: Path):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.state = StateDir(tmp / "state")
        self.repository = write_test_repository(tmp / "repo")
        self.output = tmp / "serve.out"
        cmd = [sys.executable, "-c", "from builder.cli import main; main()", "serve",
               "--repository", str(self.repository), "--http-port", str(self.http), "--grpc-port", str(self.grpc),
               "--metrics-port", str(self.metrics), "--public-address", "127.0.0.1",
               "--state-dir", str(self.state.path), "--allowed-ip", "127.0.0.1/32", "--trusted-proxy", "127.0.0.3",
               "--public", "--log-file", str(tmp / "triton.log")]   # IP rules here; keys: test_openai_serve.py
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output.read_text()
            if b"Ctrl-C to stop." in self.output.read_bytes():
                return
            time.sleep(0.1)
        raise AssertionError(f"serve was not ready in {timeout} s: {self.output.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def allowed_ips(self, *args: str):
        return CliRunner().invoke(cli(), ["allowed-ips", *args, "--state-dir", str(self.state.path)])

    def set_rules(self, *entries: str) -> None:
        result = self.allowed_ips("set", *entries)
        assert result.exit_code == 0, result.output

    def stats(self, model: str) -> int:
        status, data = http_request(self.http, "GET", f"/v2/models/{model}/stats")
        assert status == 200, data
        stats = json.loads(data)["model_stats"][0]["inference_stats"]
        return stats["success"]["count"] + stats["fail"]["count"]

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = Deployment(tmp_path_factory.mktemp("proxy"))
    try:
        dep.wait_ready()
        yield dep
    finally:
        master = running_master(dep.state)
        code = dep.stop()
    assert code == 0, dep.output.read_text()
    assert dep.output.read_text().rstrip().endswith("stopped")
    assert master is not None and not Path(f"/proc/{master}").exists(), "nginx outlived serve"


@pytest.fixture
def other_host(deployment):
    """gRPC address through which calls reach nginx from 127.0.0.2."""
    relay = SourceRelay(deployment.grpc, "127.0.0.2")
    yield f"127.0.0.1:{relay.port}"
    relay.close()


def assert_refused_everywhere(dep: Deployment, grpc_url: str, source: str = "127.0.0.2") -> None:
    status, body = http_infer(dep.http, "hello", source=source)
    assert (status, body) == (403, REFUSED_TEXT)
    with pytest.raises(InferenceServerException) as e:
        grpc_infer(grpc_url, "hello")
    assert e.value.status() == "StatusCode.PERMISSION_DENIED"
    with pytest.raises(InferenceServerException) as e:
        grpc_stream(grpc_url, "hello world")
    assert e.value.status() == "StatusCode.PERMISSION_DENIED"
    assert grpc_status_from(source, dep.grpc) == ("7", "this address is not in the deployment's allowed IPs")


def assert_answered_everywhere(dep: Deployment, grpc_url: str, source: str = "127.0.0.1") -> None:
    status, body = http_infer(dep.http, "hello", source=source)
    assert status == 200 and answer(body) == "HELLO", body
    assert grpc_infer(grpc_url, "hello") == "HELLO"
    assert grpc_stream(grpc_url, "hello streaming world") == ["hello", "streaming", "world"]
    assert grpc_status_from(source, dep.grpc) == ("13", "Unable to parse request")  # Triton's own answer


# -- tests -----------------------------------------------------------------------------------------------

def test_allowed_client_is_answered_over_http_grpc_and_streams(deployment):
    deployment.set_rules("127.0.0.1/32")
    assert_answered_everywhere(deployment, deployment.grpc_url)


def test_other_client_is_refused_and_never_reaches_triton(deployment, other_host):
    deployment.set_rules("127.0.0.1/32")
    before = deployment.stats("echo"), deployment.stats("stream")
    assert_refused_everywhere(deployment, other_host)
    assert (deployment.stats("echo"), deployment.stats("stream")) == before
    time.sleep(1.2)  # access log buffer flush=1s
    refusals = [ln for ln in deployment.state.access_log.read_text().splitlines() if ln.startswith("127.0.0.2 ")]
    assert refusals and all(ln.endswith("refused") for ln in refusals)


def test_add_applies_without_restart_or_dropping_in_flight_then_remove_shuts_out(deployment, other_host):
    deployment.set_rules("127.0.0.1/32")
    master, echo_count = running_master(deployment.state), deployment.stats("echo")
    results, failures, stop = {}, [], threading.Event()
    steady: list[tuple[str, object]] = []     # every steady request's outcome, in order, both protocols

    def keep(name, call):
        try:
            results[name] = call()
        except Exception as e:  # noqa: BLE001 -- any failure is the finding
            failures.append(f"{name}: {e!r}")

    def steady_traffic():
        client = grpcclient.InferenceServerClient(deployment.grpc_url)  # one HTTP/2 connection throughout
        while not stop.is_set():
            try:    # a 502/503 from nginx does not raise: it is recorded and asserted below
                status, body = http_infer(deployment.http, "tick")
                steady.append(("http", (status, answer(body) if status == 200 else body)))
            except Exception as e:  # noqa: BLE001 -- a dropped connection is the finding
                steady.append(("http", repr(e)))
            try:
                steady.append(("grpc", client.infer("echo", [_text_input("tick")]).as_numpy("text")[0].decode()))
            except Exception as e:  # noqa: BLE001
                steady.append(("grpc", repr(e)))
        client.close()

    threads = [threading.Thread(target=keep, args=("slow-http", lambda: http_infer(deployment.http, "slow: http"))),
               threading.Thread(target=keep, args=("slow-stream", lambda: grpc_stream(deployment.grpc_url,
                                                                                       "slow: a b c d e"))),
               threading.Thread(target=steady_traffic)]
    for t in threads:
        t.start()
    time.sleep(0.4)  # the slow request and stream are in flight now
    result = deployment.allowed_ips("add", "127.0.0.2")
    assert result.exit_code == 0 and "nginx reloaded" in result.output, result.output
    assert_answered_everywhere(deployment, other_host, source="127.0.0.2")
    stop.set()
    for t in threads:
        t.join(60)

    assert failures == []
    # every steady request before, during and after the reload was answered, over both protocols
    assert {kind for kind, _ in steady} == {"http", "grpc"}
    wrong = [(kind, outcome) for kind, outcome in steady
             if outcome != ((200, "TICK") if kind == "http" else "TICK")]
    assert wrong == [], f"{len(wrong)} of {len(steady)} steady requests failed during the reload: {wrong[:5]}"
    assert results["slow-http"][0] == 200 and answer(results["slow-http"][1]) == "SLOW: HTTP"
    assert results["slow-stream"] == ["slow:", "a", "b", "c", "d", "e"]
    assert running_master(deployment.state) == master  # reloaded, not restarted
    assert deployment.stats("echo") > echo_count        # same Triton: its counters did not reset
    assert json.loads(deployment.state.rules_file.read_text())["allowed_ips"] == ["127.0.0.1", "127.0.0.2"]

    result = deployment.allowed_ips("remove", "127.0.0.2/32")
    assert result.exit_code == 0, result.output
    assert_refused_everywhere(deployment, other_host)
    assert_answered_everywhere(deployment, deployment.grpc_url)


def test_forwarded_for_is_honoured_only_from_a_trusted_proxy(deployment):
    deployment.set_rules("127.0.0.1/32")
    spoof = {"X-Forwarded-For": "127.0.0.1"}
    assert http_infer(deployment.http, "hi", source="127.0.0.2", headers=spoof)[0] == 403
    relay = SourceRelay(deployment.grpc, "127.0.0.2")
    try:
        with pytest.raises(InferenceServerException, match="not in the deployment's allowed IPs"):
            grpc_infer(f"127.0.0.1:{relay.port}", "hi", headers={"x-forwarded-for": "127.0.0.1"})
    finally:
        relay.close()

    # 127.0.0.3 is the trusted proxy: its header names the client
    status, body = http_infer(deployment.http, "hi", source="127.0.0.3", headers=spoof)
    assert status == 200 and answer(body) == "HI"
    relay = SourceRelay(deployment.grpc, "127.0.0.3")
    try:
        assert grpc_infer(f"127.0.0.1:{relay.port}", "hi", headers={"x-forwarded-for": "127.0.0.1"}) == "HI"
    finally:
        relay.close()
    # ... but the right-most untrusted address counts, and the proxy itself is not a client
    chained = {"X-Forwarded-For": "127.0.0.1, 127.0.0.2"}
    assert http_infer(deployment.http, "hi", source="127.0.0.3", headers=chained)[0] == 403
    assert http_infer(deployment.http, "hi", source="127.0.0.3")[0] == 403


@pytest.mark.parametrize("args, says", [
    (["add", "127.0.0.2/8"], "'127.0.0.2/8' has host bits set: write the network 127.0.0.0/8"),
    (["add", "not-an-ip"], "'not-an-ip' is not an IPv4/IPv6 address or CIDR block"),
    (["add", ""], "empty allowed IP entry"),
    (["set", "127.0.0.2", "300.1.1.1"], "'300.1.1.1' is not an IPv4/IPv6 address"),
    (["remove", "127.0.0.9"], "127.0.0.9 not in the allowed IPs"),
    (["remove", "127.0.0.1"], "removing every entry would let everyone in"),
    (["set"], "give the new entries, or --everyone"),
])
def test_invalid_entries_are_refused_and_running_rules_unchanged(deployment, other_host, args, says):
    deployment.set_rules("127.0.0.1/32")
    conf, rules = deployment.state.conf.read_bytes(), deployment.state.rules_file.read_bytes()
    master = running_master(deployment.state)
    result = deployment.allowed_ips(*args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and says in result.output and result.output.count("\n") == 1
    assert deployment.state.conf.read_bytes() == conf and deployment.state.rules_file.read_bytes() == rules
    assert running_master(deployment.state) == master
    assert http_infer(deployment.http, "hi")[0] == 200
    assert http_infer(deployment.http, "hi", source="127.0.0.2")[0] == 403


def test_a_config_nginx_rejects_never_replaces_the_working_one(deployment):
    deployment.set_rules("127.0.0.1/32")
    conf = deployment.state.conf.read_bytes()
    with pytest.raises(ProxyError, match="nginx rejected the rendered config .*the running config is unchanged"):
        install_config(deployment.state, conf.decode().replace("deny all;", "deny everyone;"))
    assert deployment.state.conf.read_bytes() == conf
    assert not deployment.state.conf.with_name("nginx.conf.new").exists()
    assert http_infer(deployment.http, "hi")[0] == 200


def test_list_shows_entries_and_trusted_proxies(deployment):
    deployment.set_rules("127.0.0.1/32", "2001:db8::/32")
    result = deployment.allowed_ips("list")
    assert result.output.splitlines() == ["127.0.0.1", "2001:db8::/32",
                                          "127.0.0.3 (trusted proxy: X-Forwarded-For honoured)"]


def test_empty_list_lets_everyone_in(deployment, other_host):
    deployment.set_rules("--everyone")
    try:
        assert_answered_everywhere(deployment, other_host, source="127.0.0.2")
    finally:
        deployment.set_rules("127.0.0.1/32")


def test_large_bodies_pass_with_unprivileged_workers(deployment):
    """As root, workers run as nobody and cannot reach the state dir: nothing may need temp files."""
    deployment.set_rules("127.0.0.1/32")
    text = "x" * (4 << 20)
    status, body = http_infer(deployment.http, text)
    assert status == 200 and answer(body) == text.upper()
    assert grpc_infer(deployment.grpc_url, text) == text.upper()


def test_http_streams_are_not_buffered(deployment):
    """/generate_stream (server-sent events) through nginx: each event arrives when Triton sends it."""
    deployment.set_rules("127.0.0.1/32")
    conn = http.client.HTTPConnection("127.0.0.1", deployment.http, timeout=30)
    conn.request("POST", "/v2/models/stream/generate_stream", json.dumps({"text": "slow: a b c d"}))
    response, arrivals = conn.getresponse(), []
    assert response.status == 200
    while line := response.readline():
        if line.startswith(b"data: "):
            arrivals.append((time.monotonic(), json.loads(line[6:])["text"]))
    conn.close()
    assert [text for _, text in arrivals] == ["slow:", "a", "b", "c", "d"]
    assert arrivals[-1][0] - arrivals[0][0] > 0.6  # 4 x 0.3 s apart, not all at once at the end


def test_nginx_that_cannot_listen_says_which_ports(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        layout = ProxyLayout(port, free_ports(1)[0], "127.0.0.1:9", "127.0.0.1:9", ("127.0.0.1",))
        proxy = Proxy(StateDir(tmp_path / "state"), layout)
        with pytest.raises(ProxyError, match=f"cannot listen on 127.0.0.1 port {port} .*--http-port"):
            proxy.start()
    assert proxy.process is None or proxy.process.poll() is not None


def test_triton_and_metrics_stay_off_the_public_ports(deployment):
    layout = deployment.state.read_layout()
    internal = {layout.triton_http, layout.triton_grpc}
    assert all(address.startswith("127.0.0.1:") for address in internal)
    assert not internal & {f"127.0.0.1:{deployment.http}", f"127.0.0.1:{deployment.grpc}"}
    assert http_request(deployment.http, "GET", "/metrics")[0] == 404
    assert http_request(deployment.http, "GET", "/v2/health/ready")[0] == 200


def test_a_second_serve_on_the_same_state_dir_is_refused(deployment):
    result = CliRunner().invoke(cli(), ["serve", "--repository", str(deployment.repository),
                                        "--state-dir", str(deployment.state.path)])
    assert result.exit_code == 1 and "a proxy already runs from" in result.output, result.output
    with pytest.raises(ProxyError, match="already runs"):
        Proxy(deployment.state, deployment.state.read_layout()).prepare()


def test_commands_without_a_deployment_say_how_to_find_one(tmp_path):
    result = CliRunner().invoke(cli(), ["allowed-ips", "list", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "no deployment state in" in result.output and "--state-dir" in result.output


def test_rules_without_the_proxy_are_refused(tmp_path):
    result = CliRunner().invoke(cli(), ["serve", "--repository", str(tmp_path), "--no-proxy",
                                        "--allowed-ip", "203.0.113.0/24"])
    assert result.exit_code == 1 and "enforced by the proxy: drop --no-proxy" in result.output
