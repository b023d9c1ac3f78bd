"""The OpenAI gateway (builder/serve/gateway) as a child process of `serve`: on loopback, behind
nginx, started once Triton is ready and stopped before it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from backends.errors import ServeError
from builder.serve.gateway.config import DEFAULT_MAX_BODY_BYTES
from builder.serve.processes import die_with_parent, stop_process_group


@dataclass
class GatewayProcess:
    triton_http: str                    # Triton's HTTP host:port
    repository: Path
    state_dir: Path                     # holds api-keys.json (serve's state directory)
    port: int
    public: bool = False                # no API keys
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    idle_timeout: float = 0.0                         # scale to zero (0: never unload)
    idle_timeouts: dict[str, float] = field(default_factory=dict)   # per deployment name
    hold_limit: float = 120.0                         # longest a request waits for a load
    memory_budget: int = 0                            # bytes (0: no budget)
    max_queue: int | None = None                      # backpressure (None: 2 x max_batch_size)
    max_queues: dict[str, int] = field(default_factory=dict)        # per deployment name
    triton_grpc: str = ""                             # Triton's gRPC host:port, behind the relay
    grpc_port: int = 0                                # the waking gRPC relay's port (0: none)
    metrics: bool = True                              # False: --no-metrics
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "builder.serve.gateway", "--triton", self.triton_http,
               "--repository", str(Path(self.repository).resolve()), "--state-dir", str(self.state_dir),
               "--port", str(self.port), "--max-body-bytes", str(self.max_body_bytes),
               "--idle-timeout", str(self.idle_timeout), "--hold-limit", str(self.hold_limit),
               "--memory-budget", str(self.memory_budget)]
        if self.grpc_port:
            cmd += ["--triton-grpc", self.triton_grpc, "--grpc-port", str(self.grpc_port)]
        for name, seconds in sorted(self.idle_timeouts.items()):
            cmd += ["--idle-timeout-for", f"{name}={seconds}"]
        if self.max_queue is not None:
            cmd += ["--max-queue", str(self.max_queue)]
        for name, queue in sorted(self.max_queues.items()):
            cmd += ["--max-queue-for", f"{name}={queue}"]
        if not self.metrics:
            cmd.append("--no-metrics")
        return cmd + (["--public"] if self.public else [])

    def start(self, timeout: float = 30.0) -> "GatewayProcess":
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeError(f"the OpenAI gateway exited at start with code {self.process.returncode}: "
                                 f"see {self.log_path or 'its log (pass --log-file)'}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise ServeError(f"the OpenAI gateway did not answer on {self.address} within {timeout:.0f} s")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (uvicorn finishes open responses and flushes key usage), then the group."""
        proc, self.process = self.process, None
        if proc is not None:
            stop_process_group(proc, ((signal.SIGTERM, grace),))
