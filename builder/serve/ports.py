"""Free loopback ports: the one helper serve, the tests and the benchmarks use.

By default the kernel picks them (bind to port 0). With `SERVERLESS_TRITON_PORTS=LOW-HIGH` they
come from that range instead: a firewall-friendly range for users, and disjoint ranges for
programs that pick ports side by side (the parallel test workers), which the kernel's picks are
not: a port one program found free can be taken by the other before its server binds it."""

from __future__ import annotations

import collections
import os
import random
import socket

from backends.errors import UserError

PORT_RANGE_ENV = "SERVERLESS_TRITON_PORTS"
RECENT = 64           # ports handed out lately, not handed out again (their server may not be up yet)
_recent: collections.deque[int] = collections.deque(maxlen=RECENT)


def port_range() -> range | None:
    """The range named by SERVERLESS_TRITON_PORTS, or None (the kernel picks)."""
    value = os.environ.get(PORT_RANGE_ENV, "").strip()
    if not value:
        return None
    low, sep, high = value.partition("-")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        raise UserError(f"{PORT_RANGE_ENV}={value!r} is not a port range: write LOW-HIGH, e.g. 20000-24999, "
                        "or unset it to let the kernel pick") from None
    if not 1024 <= lo <= 65535 or not 1024 <= hi <= 65535:
        raise UserError(f"{PORT_RANGE_ENV}={value!r}: ports must lie in 1024..65535 (LOW-HIGH, e.g. 20000-24999)")
    if lo > hi:
        raise UserError(f"{PORT_RANGE_ENV}={value!r}: LOW is above HIGH; write LOW-HIGH, e.g. {hi}-{lo}")
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
    moment later). From SERVERLESS_TRITON_PORTS in random order when it is set, else from the
    kernel; either way never one this process handed out recently, since callers that pick one
    port at a time (serve picks five) bind none of them before asking for the next."""
    allowed = port_range()
    socks: list[socket.socket] = []
    try:
        picked: list[socket.socket] = []
        if allowed is None:
            for _ in range(n + len(_recent)):
                if len(picked) == n:
                    break
                s = _bound(host, 0)
                if s is None:
                    break
                socks.append(s)     # held even when skipped, so the kernel hands out another
                if s.getsockname()[1] not in _recent:
                    picked.append(s)
            if len(picked) < n:
                raise OSError(f"the kernel has fewer than {n} free ports on {host}")
        else:
            for port in random.sample(allowed, len(allowed)):
                if len(picked) == n:
                    break
                s = None if port in _recent else _bound(host, port)
                if s is not None:
                    socks.append(s)
                    picked.append(s)
            if len(picked) < n:
                raise UserError(f"{PORT_RANGE_ENV}={os.environ[PORT_RANGE_ENV]} has fewer than {n} free ports "
                                f"on {host} (besides the {len(_recent)} handed out lately): widen the range")
        ports = [s.getsockname()[1] for s in picked]
        _recent.extend(ports)
        return ports
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
