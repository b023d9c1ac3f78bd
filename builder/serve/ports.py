"""Free loopback ports: the one helper serve, the tests and the benchmarks use.

By default the kernel picks them (bind to port 0). With `SERVERLESS_TRITON_PORTS=LOW-HIGH` they
come from that range instead: a firewall-friendly range for users, and disjoint ranges for
programs that pick ports side by side (the parallel test workers), which the kernel's picks are
not: a port one program found free can be taken by the other before its server binds it."""

from __future__ import annotations

import os
import random
import socket

from backends.errors import UserError

PORT_RANGE_ENV = "SERVERLESS_TRITON_PORTS"


def port_range() -> range | None:
    """The range named by SERVERLESS_TRITON_PORTS, or None (the kernel picks)."""
    value = os.environ.get(PORT_RANGE_ENV, "").strip()
    if not value:
        return None
    low, sep, high = value.partition("-")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        lo = hi = 0
    if not sep or not 1024 <= lo <= hi <= 65535:
        raise UserError(f"{PORT_RANGE_ENV}={value!r} is not a port range: write LOW-HIGH, e.g. 20000-24999 "
                        "(1024..65535), or unset it to let the kernel pick")
    return range(lo, hi + 1)


def _bound(host: str, port: int) -> socket.socket | None:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.bind((host, port))    # no SO_REUSEADDR: a port still in TIME_WAIT counts as taken
        return s
    except OSError:
        s.close()
        return None


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free now (all bound at once, so none repeats; the server binds them a
    moment later). From SERVERLESS_TRITON_PORTS in random order when it is set (a port just
    given back is not the next one handed out), else from the kernel."""
    allowed = port_range()
    socks: list[socket.socket] = []
    try:
        if allowed is None:
            for _ in range(n):
                s = _bound(host, 0)
                if s is None:
                    raise OSError(f"no free port on {host}")
                socks.append(s)
        else:
            for port in random.sample(allowed, len(allowed)):
                if len(socks) == n:
                    break
                s = _bound(host, port)
                if s is not None:
                    socks.append(s)
            if len(socks) < n:
                raise UserError(f"{PORT_RANGE_ENV}={os.environ[PORT_RANGE_ENV]} has fewer than {n} free ports "
                                f"on {host}: widen the range")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
