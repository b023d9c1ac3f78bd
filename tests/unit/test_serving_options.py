"""serve's scale-to-zero options: the memory budget's sizes and the idle timeouts of a deployment file."""

from __future__ import annotations

import pytest

from backends.errors import InvalidArgumentError
from builder.serve.gateway.memory import machine_memory_bytes
from builder.serve.serving import idle_timeouts, parse_memory_budget


@pytest.mark.parametrize("value,expected", [("0", 0), ("800M", 800 * 2**20), ("12G", 12 * 2**30),
                                            ("12GiB", 12 * 2**30), ("1.5g", int(1.5 * 2**30)), ("4096", 4096),
                                            ("512KB", 512 * 2**10)])
def test_memory_budget_sizes(value, expected):
    assert parse_memory_budget(value) == expected


def test_memory_budget_share_of_the_machine():
    assert parse_memory_budget("80%") == int(machine_memory_bytes() * 0.8) > 0


@pytest.mark.parametrize("value", ["lots", "-1G", "120%", "0%", "12 parsecs", ""])
def test_bad_memory_budgets_name_the_fix(value):
    with pytest.raises(InvalidArgumentError, match="memory budget"):
        parse_memory_budget(value)


def test_idle_timeouts_from_the_deployment_file(tmp_path):
    f = tmp_path / "deployment.toml"
    f.write_text('[[models]]\nname = "a"\nidle_timeout = 30\n\n[[models]]\nname = "b"\nkind = "embedding"\n')
    idle = idle_timeouts(300, f)
    assert idle.default == 300 and idle.by_name == {"a": 30.0} and idle.any
    assert not idle_timeouts(0, None).any
    with pytest.raises(InvalidArgumentError, match="--idle-timeout -1"):
        idle_timeouts(-1, None)
    f.write_text('[[models]]\nname = "a"\nidle_timeout = -5\n')
    with pytest.raises(InvalidArgumentError, match="idle_timeout must be whole seconds >= 0"):
        idle_timeouts(300, f)


def test_tritonserver_exit_timeout_is_passed_through(tmp_path):
    """tritonserver waits its exit timeout for idle client connections and for a model stuck live
    after a failed reload: serve shortens it where its proxy has drained every request first."""
    from builder.serve.triton_server import DRAINED_EXIT_TIMEOUT_S, TritonServer

    default = TritonServer(tmp_path, tritonserver=tmp_path / "tritonserver", cache_dir=tmp_path / "cache").command()
    drained = TritonServer(tmp_path, tritonserver=tmp_path / "tritonserver", cache_dir=tmp_path / "cache",
                           exit_timeout_s=DRAINED_EXIT_TIMEOUT_S).command()
    assert "--exit-timeout-secs=15" in default
    assert f"--exit-timeout-secs={DRAINED_EXIT_TIMEOUT_S}" in drained and DRAINED_EXIT_TIMEOUT_S < 15
