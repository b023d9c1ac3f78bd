"""`serverless-triton serve` as a user runs it: ready line, answers, clean stop, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_NAME

from builder.serve.ports import free_ports
from tests.support.llm_client import generate

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "builder"]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and ("tritonserver" in cmdline or "triton_python_backend_stub" in cmdline):
            found.append(f"{pid}: {cmdline[:120]}")
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_then_stops_without_orphans(tiny_repository, tmp_path, sig):
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen(
        CLI + ["serve", "-r", str(tiny_repository), "--no-proxy", "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics), "--log-file", str(tmp_path / "triton.log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip() == "Ctrl-C to stop.":
                break
        out = "".join(lines)
        assert "ready" in out and f"{TINY_NAME}:fp32" in out and f"127.0.0.1:{http}" in out, out
        r = generate(f"127.0.0.1:{http}", f"{TINY_NAME}-fp32", {"text_input": "Hello", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["completion_tokens"] >= 1
        assert _processes_mentioning(str(tiny_repository))
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, rest
        assert "stopped" in rest
        assert not _processes_mentioning(str(tiny_repository)), "orphan processes after stop"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_missing_repository_is_one_line(tmp_path):
    r = subprocess.run(CLI + ["serve", "-r", str(tmp_path / "nope"), "--no-proxy"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().startswith("Error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
