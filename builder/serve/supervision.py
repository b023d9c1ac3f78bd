"""Keeping serve's processes up: tritonserver, the OpenAI gateway and nginx are restarted when they
die, with a bounded back-off, and the cause (exit code or signal) is logged.

The restart policy is Kubernetes' for a container: restart at once the first time, then wait 1 s,
2 s, 4 s ... up to MAX_BACKOFF between attempts; a piece that stayed up STABLE_SECONDS is healthy
again (its back-off starts over). A piece that died GIVE_UP times in a row without ever staying up
that long is broken (a bad config, a port taken for good): serve then exits with the reason, so
whatever runs serve (systemd, a pod) sees it instead of an endless loop. A Python stub that dies
inside Triton is the gateway's business (builder/serve/gateway/stubs.py): Triton stays up then.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.errors import ServeError, UserError
from builder.serve.gateway_process import GatewayProcess
from builder.serve.proxy import Proxy
from builder.serve.triton_server import TritonServer

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_SECONDS = 60.0
GIVE_UP = 6


def exit_cause(returncode: int | None) -> str:
    """`exit code 3`, `killed by SIGKILL`, or `not started` for a Popen returncode."""
    if returncode is None:
        return "not started"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class Piece:
    """One supervised process: `exit_status()` is None while it runs, else its Popen returncode;
    `restart()` clears what the dead one left (its process group, shared memory) and starts a new
    one, returning once it serves (or raising)."""

    name: str
    exit_status: Callable[[], int | None]
    restart: Callable[[], None]
    log: str                             # where its own log is, for the operator
    backoff: float = 0.0                 # seconds before the next attempt (0: at once)
    next_try: float = 0.0                # monotonic
    down_since: float | None = None
    up_since: float = field(default_factory=time.monotonic)
    failures: int = 0                    # deaths in a row without STABLE_SECONDS up
    restarts: int = 0                    # successful restarts, all time


def process_status(get_process: Callable[[], object | None]) -> Callable[[], int | None]:
    """exit_status for a piece whose Popen is `get_process()` (None: it is not running)."""
    def status() -> int | None:
        proc = get_process()
        if proc is None:
            return -signal.SIGKILL        # stopped by a failed restart: treated as dead
        return proc.poll()                # type: ignore[attr-defined]
    return status


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Supervisor:
    def __init__(self, pieces: list[Piece], echo: Callable[[str], None] = _stderr,
                 clock: Callable[[], float] = time.monotonic):
        self.pieces, self.echo, self.clock = pieces, echo, clock

    def check(self) -> None:
        """One look at every piece: restart the dead ones whose back-off has passed. Raises
        ServeError when a piece keeps dying (GIVE_UP deaths in a row)."""
        for piece in self.pieces:
            status = piece.exit_status()
            now = self.clock()
            if status is None and piece.down_since is None:
                if piece.failures and now - piece.up_since >= STABLE_SECONDS:
                    piece.failures, piece.backoff = 0, 0.0
                continue
            if piece.down_since is None:
                piece.down_since = now
                piece.failures += 1
                self.echo(f"supervisor: {piece.name} died ({exit_cause(status)}); see {piece.log}")
                if piece.failures >= GIVE_UP:
                    raise ServeError(f"{piece.name} died {piece.failures} times in a row, each within "
                                     f"{STABLE_SECONDS:.0f} s of its start: giving up; see {piece.log}")
                piece.next_try = now + piece.backoff
            if now < piece.next_try:
                continue
            self._restart(piece)

    def _restart(self, piece: Piece) -> None:
        t0 = self.clock()
        self.echo(f"supervisor: restarting {piece.name} (attempt {piece.failures})")
        piece.backoff = min(max(piece.backoff * 2, FIRST_BACKOFF), MAX_BACKOFF)
        try:
            piece.restart()
        except UserError as e:
            now = self.clock()
            piece.failures += 1
            piece.next_try = now + piece.backoff
            self.echo(f"supervisor: {piece.name} did not come back ({e}); next try in {piece.backoff:.0f} s")
            if piece.failures >= GIVE_UP:
                raise ServeError(f"{piece.name} could not be restarted {piece.failures} times: giving up "
                                 f"({e}); see {piece.log}") from None
            return
        piece.down_since, piece.up_since = None, self.clock()
        piece.restarts += 1
        self.echo(f"supervisor: {piece.name} is back after {self.clock() - t0:.1f} s")


def serve_pieces(server: TritonServer, proxy: Proxy | None = None, gateway: GatewayProcess | None = None) -> list[Piece]:
    """serve's processes as supervised pieces, Triton first (the others are useless without it)."""

    def restart_triton() -> None:
        server.stop()                    # the group (orphan stubs) and the shared memory they leave
        server.start()
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise

    pieces = [Piece("tritonserver", process_status(lambda: server.process), restart_triton,
                    str(server.log_path or "its log (serve --log-file)"))]
    if gateway is not None:
        def restart_gateway() -> None:
            gateway.stop()
            gateway.start()
        pieces.append(Piece("the OpenAI gateway", process_status(lambda: gateway.process), restart_gateway,
                            str(gateway.log_path)))
    if proxy is not None:
        def restart_proxy() -> None:
            proxy.stop()                 # the dead master's workers still hold the ports: its group goes
            proxy.start()
        pieces.append(Piece("nginx", process_status(lambda: proxy.process), restart_proxy,
                            str(proxy.state.error_log)))
    return pieces
