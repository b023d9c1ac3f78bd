"""free_ports: the kernel's picks by default, a named range with SERVERLESS_TRITON_PORTS."""

from __future__ import annotations

import socket

import pytest

from backends.errors import UserError
from builder.serve.ports import PORT_RANGE_ENV, free_ports, port_range
from tests.support.worker_ports import worker_port_range


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


def test_a_taken_port_in_the_range_is_skipped(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        monkeypatch.setenv(PORT_RANGE_ENV, f"{port}-{port + 1}")
        assert free_ports(1) == [port + 1]


def test_a_range_too_small_says_to_widen_it(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        monkeypatch.setenv(PORT_RANGE_ENV, f"{port}-{port}")
        with pytest.raises(UserError, match="fewer than 1 free ports.*widen the range"):
            free_ports(1)


@pytest.mark.parametrize("value", ["20000", "abc-def", "30000-20000", "80-90", "60000-70000", "1-2-3"])
def test_a_malformed_range_names_the_variable_and_the_form(monkeypatch, value):
    monkeypatch.setenv(PORT_RANGE_ENV, value)
    with pytest.raises(UserError, match=rf"{PORT_RANGE_ENV}=.*LOW-HIGH"):
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
