"""free_ports: the kernel's picks by default, a named range with SERVERLESS_TRITON_PORTS, and never
a port handed out lately (serve picks its ports one at a time before binding any)."""

from __future__ import annotations

import socket

import pytest

from backends.errors import UserError
from builder.serve import ports as ports_module
from builder.serve.ports import PORT_RANGE_ENV, free_port, free_ports, port_range
from tests.support.worker_ports import worker_port_range


@pytest.fixture(autouse=True)
def forget_recent(monkeypatch):
    monkeypatch.setattr(ports_module, "_recent", type(ports_module._recent)(maxlen=ports_module.RECENT))


def _two_free_neighbours() -> tuple[socket.socket, int]:
    """A socket holding port p, with p + 1 free (retried: the neighbour may be taken)."""
    for _ in range(50):
        held = socket.create_server(("127.0.0.1", 0))
        port = held.getsockname()[1]
        try:
            with socket.create_server(("127.0.0.1", port + 1)):
                return held, port
        except OSError:
            held.close()
    pytest.skip("no two neighbouring free ports found")


def test_without_a_range_the_kernel_picks_distinct_ports(monkeypatch):
    monkeypatch.delenv(PORT_RANGE_ENV, raising=False)
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(p > 0 for p in ports)


def test_ports_come_from_the_named_range_distinct_and_bindable(monkeypatch):
    monkeypatch.setenv(PORT_RANGE_ENV, "23000-23099")
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(23000 <= p <= 23099 for p in ports)
    for p in ports:       # given back: a server can bind them
        with socket.create_server(("127.0.0.1", p)):
            pass


@pytest.mark.parametrize("ranged", [True, False])
def test_ports_picked_one_at_a_time_never_repeat(monkeypatch, ranged):
    """serve asks for one port at a time and binds none before the last: a narrow range (or the
    kernel) must not hand the same free port out twice."""
    if ranged:
        monkeypatch.setenv(PORT_RANGE_ENV, "23100-23109")
    else:
        monkeypatch.delenv(PORT_RANGE_ENV, raising=False)
    picked = [free_port() for _ in range(10 if ranged else 40)]
    assert len(set(picked)) == len(picked)
    if ranged:    # all ten handed out lately: the range is spent until they age out
        with pytest.raises(UserError, match="fewer than 1 free ports.*handed out lately.*widen the range"):
            free_port()


def test_a_taken_port_in_the_range_is_skipped(monkeypatch):
    held, port = _two_free_neighbours()
    with held:
        monkeypatch.setenv(PORT_RANGE_ENV, f"{port}-{port + 1}")
        assert free_ports(1) == [port + 1]


def test_a_range_too_small_says_to_widen_it(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        monkeypatch.setenv(PORT_RANGE_ENV, f"{port}-{port}")
        with pytest.raises(UserError, match="fewer than 1 free ports.*widen the range"):
            free_ports(1)


@pytest.mark.parametrize("value, says", [
    ("20000", "not a port range: write LOW-HIGH"), ("abc-def", "not a port range"), ("1-2-3", "not a port range"),
    ("30000-20000", "LOW is above HIGH; write LOW-HIGH, e.g. 20000-30000"),
    ("80-90", "must lie in 1024..65535"), ("60000-70000", "must lie in 1024..65535")])
def test_a_malformed_range_names_the_variable_and_the_fix(monkeypatch, value, says):
    monkeypatch.setenv(PORT_RANGE_ENV, value)
    with pytest.raises(UserError, match=rf"{PORT_RANGE_ENV}=.*{says}"):
        port_range()


def test_an_empty_value_lets_the_kernel_pick(monkeypatch):
    monkeypatch.setenv(PORT_RANGE_ENV, " ")
    assert port_range() is None


def test_worker_ranges_are_disjoint_and_below_the_ephemeral_range():
    ranges = [worker_port_range(f"gw{i}", 3, 32768) for i in range(3)]
    bounds = [tuple(map(int, r.split("-"))) for r in ranges]
    assert bounds[0][0] == 20000 and bounds[-1][1] < 32768
    for (_, hi), (lo, _) in zip(bounds, bounds[1:]):
        assert hi < lo
    assert worker_port_range("gw0", 2, 20100) is None     # no room below a low ephemeral range
