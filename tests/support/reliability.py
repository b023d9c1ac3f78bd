"""What the reliability tests and the soak look at: serve's processes (found in /proc), how busy an
engine is, and clients that keep streaming while pieces are killed."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from builder.serve.processes import children
from tests.support.checkpoints import make_tiny_llama

STUB = "triton_python_backend_stub"
TICK = os.sysconf("SC_CLK_TCK")


def slow_llama(target: Path, tokenizer_dir: Path) -> Path:
    """A random Llama wide enough (hidden 256, context 2048) that 8 streams of 1500 tokens keep the
    CPU engine busy for seconds: a hang-up that did not stop the engine shows as seconds of work."""
    return make_tiny_llama(target, tokenizer_dir, hidden_size=256, context=2048)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`."""
    found, todo = set(), [pid]
    while todo:
        kids = set(children(todo.pop()))
        todo += list(kids - found)
        found |= kids
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stub_pid(repository: Path, model: str) -> int | None:
    """The stub process that runs `model` of `repository` (None if none runs)."""
    path = f"{Path(repository).resolve()}/{model}/1/model.py"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        args = cmdline(int(pid))
        if len(args) > 1 and args[0].endswith(STUB) and args[1] == path and alive(int(pid)):
            return int(pid)
    return None


def shm_regions(pids: set[int]) -> set[str]:
    """The Python backend's shared-memory region names these stub processes were given."""
    found = set()
    for pid in pids:
        args = cmdline(pid)
        if args and args[0].endswith(STUB):
            found |= {a for a in args if a.startswith("serverless_triton_")}
    return found


def pieces(serve_pid: int) -> dict[str, int]:
    """serve's children by role: tritonserver, nginx (its master), gateway."""
    roles = {}
    for pid in children(serve_pid):
        args = " ".join(cmdline(pid))
        if "tritonserver" in args and "--model-repository" in args:
            roles["tritonserver"] = pid
        elif "nginx" in args:
            roles["nginx"] = pid
        elif "builder.serve.gateway" in args:
            roles["gateway"] = pid
    return roles


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def busy(pid: int, window: float = 0.5) -> float:
    """Cores `pid` used over the next `window` seconds."""
    before = cpu_seconds(pid)
    time.sleep(window)
    return (cpu_seconds(pid) - before) / window


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes of a process; `field` RssShmem: the part that is shared memory (a Python
    stub's and Triton's mappings of the stubs' regions count there)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def metric_sum(url: str, family: str) -> float | None:
    """Sum of a family's samples on a Prometheus endpoint; None when the family is not there."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None
    values = [float(m[2]) for m in map(_SAMPLE.match, text.splitlines()) if m and m[1] == family]
    return sum(values) if values else None


@dataclass
class Outcome:
    kind: str           # ok | http <status> | error event | exception <name>
    seconds: float
    chunks: int = 0
    detail: str = ""


@dataclass
class StreamingClients:
    """`n` clients that each stream completions back to back until `stop()`; every request's
    outcome is kept, so a test can check each one ended (an answer or an error) within `timeout`."""

    url: str
    model: str
    n: int = 4
    max_tokens: int = 400
    timeout: float = 60.0
    # per client: "v1" (/v1/completions) or a Triton stream model (/v2/models/<it>/generate_stream)
    routes: tuple[str, ...] = ()
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> StreamingClients:
        routes = self.routes or ("v1",) * self.n
        self._threads = [threading.Thread(target=self._run, args=(routes[i % len(routes)],), daemon=True)
                         for i in range(self.n)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 10)
        assert not any(t.is_alive() for t in self._threads), "a streaming client hung past its timeout"
        return self.outcomes

    def _run(self, route: str) -> None:
        if route == "v1":
            url = f"{self.url}/v1/completions"
            body = {"model": self.model, "prompt": "Once upon a time", "max_tokens": self.max_tokens, "stream": True}
        else:
            url = f"{self.url}/v2/models/{route}/generate_stream"
            body = {"text_input": "Once upon a time", "max_tokens": self.max_tokens}
        while not self._stop.is_set():
            t0, chunks = time.monotonic(), 0
            try:
                with httpx.stream("POST", url, json=body, timeout=self.timeout) as r:
                    if r.status_code != 200:
                        r.read()
                        self.outcomes.append(Outcome(f"http {r.status_code}", time.monotonic() - t0,
                                                     detail=r.text[:200]))
                        time.sleep(0.05)
                        continue
                    kind, detail = "ok", ""
                    for line in r.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:     # OpenAI's shape, or Triton's: {"error": "..."}
                            error = event["error"]
                            kind, detail = "error event", (f"{error.get('code')}: {error.get('message')}"
                                                           if isinstance(error, dict) else str(error))
                            break
                        chunks += 1
                    if kind == "ok" and chunks == 0:
                        kind = "empty"
                    self.outcomes.append(Outcome(kind, time.monotonic() - t0, chunks, detail))
            except httpx.HTTPError as e:
                self.outcomes.append(Outcome(f"exception {type(e).__name__}", time.monotonic() - t0, chunks))
                time.sleep(0.05)
