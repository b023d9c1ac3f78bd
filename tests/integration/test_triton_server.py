"""TritonServer's lifecycle leaves nothing behind: its Python stubs' shared memory is gone after a
clean stop and after tritonserver itself was killed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from builder.serve.ports import free_ports
from builder.serve.triton_server import SHM_DIR, Ports, TritonServer
from tests.support.echo_models import ECHO_CONFIG, ECHO_MODEL, write_python_model

pytestmark = pytest.mark.slow


def _echo_repository(root: Path) -> Path:
    write_python_model(root, "echo", ECHO_CONFIG, ECHO_MODEL)
    return root


def _echo(server: TritonServer) -> str:
    with httpclient.InferenceServerClient(server.http_url) as c:
        text = httpclient.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hi"], dtype=object))
        return c.infer("echo", [text]).as_numpy("text")[0].decode()


def _regions(server: TritonServer) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{server.shm_prefix}*"))


@pytest.mark.parametrize("crash", [False, True], ids=["clean-stop", "server-killed"])
def test_no_shared_memory_left_behind(tmp_path, cache_dir, crash):
    server = TritonServer(_echo_repository(tmp_path / "repo"), Ports(*free_ports(3)), cache_dir=cache_dir,
                          log_path=tmp_path / "triton.log")
    with server:
        assert _echo(server) == "HI"
        assert _regions(server), "the Python stub's region should carry this server's prefix"
        if crash:  # server and stubs killed at once: nobody finalizes, the regions stay in /dev/shm
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(30)
            assert _regions(server)
    assert not _regions(server)
