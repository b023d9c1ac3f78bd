"""Start, watch and stop a real tritonserver process.

On CPU machines the binary is the one bundled in the `nvidia-pytriton` wheel; its Python backend
needs the stub built for the running interpreter, and the stub runs models with this interpreter's
environment (so openvino_genai and tokenizers import inside Triton). The project itself is not on
the stub's path: every Python model imports the runtime its repository carries
(builder/build/runtime.py). On GPU hosts pass the NGC container's binary with `tritonserver=`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from backends.errors import ServeError
from builder.paths import cache_root
from builder.serve.processes import die_with_parent, stop_process_group


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def _pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("nvidia-pytriton is not installed: run `make install` (or pass --tritonserver PATH)")
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


def bundled_tritonserver() -> Path:
    path = _pytriton_dir() / "bin" / "tritonserver"
    if not path.exists():
        raise ServeError(f"no tritonserver binary at {path}: reinstall nvidia-pytriton or pass --tritonserver PATH")
    return path


def backend_directory(cache_dir: Path) -> Path:
    """A backend directory whose Python backend has the stub for the running Python.

    The wheel ships one stub per Python minor version beside the backend; Triton looks for it next
    to libtriton_python.so, so we assemble that layout once in a cache directory.
    """
    ts = _pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = ts / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServeError(f"nvidia-pytriton has no Python backend stub for Python {version}: use Python 3.11-3.12")
    target = Path(cache_dir) / f"backends-py{version}"
    if not (target / "python" / "triton_python_backend_stub").exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ts / "backends" / "python", tmp / "python")
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def server_environment() -> dict[str, str]:
    """Environment for tritonserver: its bundled libraries, and this interpreter for the stub."""
    env = dict(os.environ)
    libs = [str(_pytriton_dir().parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    site = sysconfig.get_paths()["purelib"]
    env["PYTHONPATH"] = ":".join(p for p in (site, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


SHM_DIR = Path("/dev/shm")


def remove_shared_memory(prefix: str) -> int:
    """Unlink the shared-memory regions named `prefix*`; returns how many were left over."""
    left = list(SHM_DIR.glob(f"{prefix}*")) if prefix and SHM_DIR.is_dir() else []
    for region in left:
        region.unlink(missing_ok=True)
    return len(left)


def repository_models(repository: Path) -> list[str]:
    """The model folders of a repository: `--load-model=*` would also try `_runtime` (the code the
    models import, no model) and fail the whole server."""
    return sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))


# tritonserver's exit timeout once nothing can be in flight: time to unload the models (20 models
# in 1-3 s on 2 cores), not to wait out a connection or a model stuck "live" (15 s each before)
DRAINED_EXIT_TIMEOUT_S = 5
DEFAULT_EXIT_TIMEOUT_S = 15   # clients reach Triton directly: in-flight inferences may finish


@dataclass
class TritonServer:
    """A tritonserver child process with explicit model control.

    Use as a context manager; `stop()` always reaps the whole process group (the Python stubs too).
    """

    repository: Path
    ports: Ports = field(default_factory=Ports)
    address: str = "127.0.0.1"
    metrics_address: str | None = None      # None: `address` (a pod exposes it to its ServiceMonitor)
    tritonserver: Path | None = None
    cache_dir: Path = field(default_factory=cache_root)
    log_path: Path | None = None
    load_models: list[str] | None = None  # None: every model folder (one with a config.pbtxt) of the repository
    extra_args: list[str] = field(default_factory=list)
    ready_timeout: float = 300.0            # seconds wait_ready() waits for every model
    # On SIGTERM tritonserver waits this long for in-flight inferences, open client connections
    # (idle keep-alive ones too) and model unloads; it counts a model whose reload failed as live
    # until the end. Behind serve's proxy nginx and the gateway have drained every request first,
    # so `serve` passes DRAINED_EXIT_TIMEOUT_S there.
    exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S
    process: subprocess.Popen | None = None
    # Python-backend shared-memory regions (/dev/shm) of this server, named so stop() can remove
    # the ones a crashed or killed server leaves behind.
    shm_prefix: str = field(default_factory=lambda: f"serverless_triton_{uuid.uuid4().hex[:12]}_")
    # Tensor/pipeline parallel TensorRT-LLM engines: one tritonserver per MPI rank under mpirun;
    # ranks above 0 load only `rank_models` and open no endpoint (tensorrt_llm.mpi_world).
    mpi_world_size: int = 1
    rank_models: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)   # added to tritonserver's (and its stubs')

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.ports.grpc}"

    def command(self) -> list[str]:
        binary = Path(self.tritonserver) if self.tritonserver else bundled_tritonserver()
        common = [
            str(binary),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backend_directory(self.cache_dir)}",
            "--model-control-mode=explicit",
            # Every config.pbtxt is complete as built. With auto-complete on, Triton starts and stops
            # an extra stub per Python model before its real one: ~1.2 s of every cold start
            # (issue 16; measured, docs/serverless.md).
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
        ]
        rank0 = common + [
            f"--http-address={self.address}", f"--http-port={self.ports.http}",
            f"--grpc-address={self.address}", f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.metrics_address or self.address}", f"--metrics-port={self.ports.metrics}",
        ]
        for name in self.load_models if self.load_models is not None else repository_models(self.repository):
            rank0.append(f"--load-model={name}")
        rank0 += list(self.extra_args)
        if self.mpi_world_size <= 1:
            return rank0 + [f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            raise ServeError(f"this repository's TensorRT-LLM engines span {self.mpi_world_size} GPUs and need "
                             "mpirun (OpenMPI, in the docker/Dockerfile.gpu image): install it or serve there")
        cmd = [mpirun, "--allow-run-as-root"]
        for rank in range(self.mpi_world_size):
            args = rank0 if rank == 0 else common + [f"--load-model={m}" for m in self.rank_models] + [
                "--allow-http=false", "--allow-grpc=false", "--allow-metrics=false"]
            cmd += ["-n", "1", *args, f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}{rank}_", ":"]
        return cmd[:-1]

    def start(self) -> "TritonServer":
        if not Path(self.repository).is_dir():
            raise ServeError(f"model repository {self.repository} does not exist: run build-engines first")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command(), env={**server_environment(), **self.environment}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
            cwd=Path(self.repository).resolve(),  # tensorrtllm resolves relative engine paths from here
        )
        return self

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{self.http_url}{path}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def model_states(self) -> dict[str, dict]:
        """Repository index: {model name: {"state": ..., "reason": ...}}."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return {m["name"]: m for m in json.loads(r.read())}

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server and every loaded model are ready; raise with the reason if not."""
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServeError(f"tritonserver exited with code {self.process.returncode}: {self._log_hint()}")
            try:
                status, _ = self._get("/v2/health/ready")
                if status == 200:
                    return
                states = self.model_states()
                failed = {n: m.get("reason", "") for n, m in states.items() if m.get("state") == "UNAVAILABLE"}
                if failed:
                    raise ServeError("models failed to load: " + "; ".join(f"{n}: {r}" for n, r in failed.items()))
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise ServeError(f"tritonserver was not ready after {timeout:.0f} s: {self._log_hint()}")

    def _log_hint(self) -> str:
        if self.log_path and Path(self.log_path).exists():
            tail = Path(self.log_path).read_text(errors="replace").strip().splitlines()[-5:]
            return "last log lines: " + " | ".join(tail)
        return "run with a log file to see why"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM tritonserver (it finalizes its stubs), wait, then SIGKILL the whole process
        group: no orphan stubs; then remove shared memory that a killed stub left behind."""
        proc, self.process = self.process, None
        if proc is not None:
            stop_process_group(proc, ((signal.SIGTERM, timeout),), leader_only=True)
            remove_shared_memory(self.shm_prefix)

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
