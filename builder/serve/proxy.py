"""nginx in front of Triton: allow/deny by client address on the HTTP and gRPC ports.

Triton listens on loopback only; nginx owns the public ports. Every serve keeps a state directory
(default $XDG_CACHE_HOME/serverless-triton/serve-<public http port>/) so that `allowed-ips` commands run
from another shell can find the running proxy and change its rules:

    proxy.json         where nginx listens and where Triton is (written by serve at start)
    allowed_ips.json   the access rules: {"allowed_ips": [...], "trusted_proxies": [...]}
    nginx.conf         rendered from templates/nginx.conf.j2; replaced only after `nginx -t` passes
    nginx.pid          the nginx master's pid (the reload target)
    logs/              error.log, access.log, nginx.out
    tmp/               nginx temp paths (unused: buffering to disk is off)
    lock               serialises concurrent rule changes

nginx is run unprivileged-style: its own prefix (`-p STATE/`), config, pid, logs and temp paths,
nothing under /etc/nginx, /var/log/nginx or /run.
"""

from __future__ import annotations

import fcntl
import grp
import ipaddress
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from backends.errors import InvalidArgumentError, ProxyError
from builder.paths import cache_root
from builder.serve.processes import children, die_with_parent, stop_process_group
from builder.serve.tls import TlsPair, check_pair
from builder.templating import strict_environment

TEMPLATES = Path(__file__).resolve().parent / "templates"


# -- allowed-IP entries ----------------------------------------------------------------------------

def parse_entry(entry: str, what: str = "allowed IP") -> str:
    """Validate one address or CIDR block; return its canonical form (`10.0.0.0/8`, `127.0.0.1`).

    Canonical forms make `remove 127.0.0.1` match an earlier `add 127.0.0.1/32`.
    """
    text = entry.strip() if isinstance(entry, str) else ""
    if not text:
        raise InvalidArgumentError(
            f"empty {what} entry: give an address (203.0.113.7) or a CIDR block (203.0.113.0/24)")
    if "%" in text:
        raise InvalidArgumentError(f"{what} {entry!r} has an IPv6 zone id: drop the %{text.split('%', 1)[1]} part")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            loose = ipaddress.ip_network(text, strict=False)
            raise InvalidArgumentError(
                f"{what} {entry!r} has host bits set: write the network {loose} "
                f"or the single address {text.split('/')[0]}") from None
        raise InvalidArgumentError(
            f"{what} {entry!r} is not an IPv4/IPv6 address or CIDR block: "
            "write e.g. 203.0.113.7, 203.0.113.0/24, 2001:db8::1 or 2001:db8::/32") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        raise InvalidArgumentError(
            f"{what} {entry!r} is an IPv4-mapped IPv6 address, which nginx compares as IPv4: "
            f"write {net.network_address.ipv4_mapped} instead")
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def parse_entries(entries: Iterable[str], what: str = "allowed IP") -> tuple[str, ...]:
    """Validate every entry (the first bad one raises); drop duplicates, keep the order."""
    return tuple(dict.fromkeys(parse_entry(e, what) for e in entries))


@dataclass(frozen=True)
class AccessRules:
    """Who may reach the deployment. Empty `allowed_ips`: everyone."""

    allowed_ips: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()

    @classmethod
    def parse(cls, allowed_ips: Iterable[str] = (), trusted_proxies: Iterable[str] = ()) -> "AccessRules":
        return cls(parse_entries(allowed_ips), parse_entries(trusted_proxies, "trusted proxy"))

    def adding(self, entries: Iterable[str]) -> "AccessRules":
        return AccessRules(parse_entries([*self.allowed_ips, *entries]), self.trusted_proxies)

    def removing(self, entries: Iterable[str]) -> "AccessRules":
        gone = parse_entries(entries)
        missing = [e for e in gone if e not in self.allowed_ips]
        if missing:
            raise InvalidArgumentError(
                f"{', '.join(missing)} not in the allowed IPs: `serverless-triton allowed-ips list` shows them")
        return AccessRules(tuple(e for e in self.allowed_ips if e not in gone), self.trusted_proxies)

    def setting(self, entries: Iterable[str]) -> "AccessRules":
        return AccessRules(parse_entries(entries), self.trusted_proxies)


# -- state directory -------------------------------------------------------------------------------

def default_state_dir(http_port: int) -> Path:
    return cache_root() / f"serve-{http_port}"


@dataclass(frozen=True)
class ProxyLayout:
    """Where nginx listens and where it forwards to."""

    http_port: int
    grpc_port: int
    triton_http: str                  # host:port on loopback
    triton_grpc: str
    public_addresses: tuple[str, ...] = ("0.0.0.0",)
    gateway: str = ""                 # host:port of the OpenAI gateway on loopback ("": none)
    grpc_relay: str = ""              # host:port of the gateway's waking gRPC relay ("": gRPC goes to Triton)
    keys_required: bool = False       # API keys on /v2 and gRPC (auth_request to the gateway)
    wake_on_request: bool = False     # scale to zero: /v2 calls pass the gateway first, which loads their model
    max_body_bytes: int = 32 << 20    # largest /v1 body: nginx answers 413 itself (the gateway checks too)
    tls_cert: str = ""                # PEM chain served on both public ports ("": plain HTTP and h2c)
    tls_key: str = ""
    metrics: str = ""                 # host:port of serve's Prometheus endpoint (never proxied; `top` reads it)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


@dataclass(frozen=True)
class StateDir:
    path: Path

    def __post_init__(self) -> None:
        # absolute: nginx runs with -p STATE/ and would read a relative error log path twice over
        object.__setattr__(self, "path", Path(self.path).resolve())

    @property
    def layout_file(self) -> Path:
        return self.path / "proxy.json"

    @property
    def rules_file(self) -> Path:
        return self.path / "allowed_ips.json"

    @property
    def conf(self) -> Path:
        return self.path / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.path / "nginx.pid"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def error_log(self) -> Path:
        return self.logs / "error.log"

    @property
    def access_log(self) -> Path:
        return self.logs / "access.log"

    @property
    def temp_dir(self) -> Path:
        return self.path / "tmp"

    def prepare(self) -> None:
        for d in (self.path, self.logs, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def read_rules(self) -> AccessRules | None:
        """The saved rules, re-validated (the file may have been edited by hand); None if absent."""
        if not self.rules_file.exists():
            return None
        try:
            data = json.loads(self.rules_file.read_text())
            return AccessRules.parse(data.get("allowed_ips", []), data.get("trusted_proxies", []))
        except (OSError, ValueError, AttributeError) as e:
            raise ProxyError(f"{self.rules_file} is unreadable ({e}): fix it or run `allowed-ips set` again") from None

    def write_rules(self, rules: AccessRules) -> None:
        _write_atomic(self.rules_file, json.dumps(asdict(rules), indent=2) + "\n")

    def read_layout(self) -> ProxyLayout:
        try:
            data = json.loads(self.layout_file.read_text())
            data["public_addresses"] = tuple(data["public_addresses"])
            return ProxyLayout(**data)
        except FileNotFoundError:
            raise ProxyError(f"no deployment state in {self.path}: start `serverless-triton serve` "
                             "or pass the --state-dir it uses") from None
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ProxyError(f"{self.layout_file} is unreadable ({e}): restart serve to rewrite it") from None

    def write_layout(self, layout: ProxyLayout) -> None:
        _write_atomic(self.layout_file, json.dumps(asdict(layout), indent=2) + "\n")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One rule change at a time, across processes."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- rendering and validation ----------------------------------------------------------------------

def _listen(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _worker_user() -> tuple[str, str] | None:
    """Unprivileged user and group for workers when the master runs as root (else None)."""
    if os.geteuid() != 0:
        return None
    try:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_name, grp.getgrgid(nobody.pw_gid).gr_name
    except KeyError:
        raise ProxyError("running as root needs a 'nobody' user for nginx workers: create one "
                         "or run serve as an unprivileged user") from None


def render_config(state: StateDir, layout: ProxyLayout, rules: AccessRules) -> str:
    """nginx.conf text; a missing template value is an error, never an empty string."""
    env = strict_environment(TEMPLATES, trim_blocks=True, lstrip_blocks=True)
    user = _worker_user()
    return env.get_template("nginx.conf.j2").render(
        worker_processes="auto",
        worker_user=user[0] if user else None,
        worker_group=user[1] if user else None,
        pid_file=state.pid_file, error_log=state.error_log, access_log=state.access_log,
        temp_dir=state.temp_dir,
        listen_addresses=[_listen(a) for a in layout.public_addresses],
        http_port=layout.http_port, grpc_port=layout.grpc_port,
        triton_http=layout.triton_http, triton_grpc=layout.triton_grpc, grpc_relay=layout.grpc_relay,
        gateway=layout.gateway, keys_required=layout.keys_required and bool(layout.gateway),
        gated=(layout.keys_required or layout.wake_on_request) and bool(layout.gateway),
        max_body_bytes=layout.max_body_bytes,
        allowed_ips=rules.allowed_ips, trusted_proxies=rules.trusted_proxies,
        tls_cert=layout.tls_cert, tls_key=layout.tls_key,
    )


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if not found:
        raise ProxyError("nginx is not installed: run `make nginx` (apt-get install -y nginx) "
                         "or serve without the proxy (--no-proxy)")
    return found


def _nginx_args(state: StateDir, conf: Path) -> list[str]:
    # -e: the compiled-in startup error log (/var/log/nginx) is never touched.
    return [nginx_binary(), "-p", f"{state.path}/", "-e", str(state.error_log), "-c", str(conf)]


def check_config(state: StateDir, conf: Path) -> None:
    """`nginx -t` on a candidate file; raise with nginx's own complaint."""
    state.prepare()
    result = subprocess.run([*_nginx_args(state, conf), "-t", "-q"], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr + result.stdout).splitlines() if "[emerg]" in ln or "[alert]" in ln]
        detail = (lines or (result.stderr + result.stdout).strip().splitlines() or ["no output"])[0]
        raise ProxyError(f"nginx rejected the rendered config ({detail}); the running config is unchanged")


def install_config(state: StateDir, text: str) -> str | None:
    """Validate `text` with `nginx -t`, then put it in place; return the previous text (None if none).

    An invalid config never replaces a working one: it is tested as nginx.conf.new first.
    """
    candidate = state.conf.with_name("nginx.conf.new")
    candidate.write_text(text)
    try:
        check_config(state, candidate)
    except ProxyError:
        candidate.unlink(missing_ok=True)
        raise
    previous = state.conf.read_text() if state.conf.exists() else None
    os.replace(candidate, state.conf)
    return previous


# -- processes -------------------------------------------------------------------------------------

def _is_our_master(pid: int, state: StateDir) -> bool:
    """A live nginx master started on this state dir (a recycled pid is not mistaken for it)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"nginx: master" in cmdline and str(state.path).encode() in cmdline


def running_master(state: StateDir) -> int | None:
    """The pid of this state dir's nginx master if it is alive, else None."""
    try:
        pid = int(state.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_our_master(pid, state) else None


def _children(pid: int) -> set[int]:
    return set(children(pid))


def _log_size(state: StateDir) -> int:
    try:
        return state.error_log.stat().st_size
    except OSError:
        return 0


def _new_emerg(state: StateDir, offset: int) -> str | None:
    try:
        with open(state.error_log, "rb") as f:
            f.seek(offset)
            new = f.read().decode(errors="replace")
    except OSError:
        return None
    return next((ln for ln in new.splitlines() if "[emerg]" in ln), None)


def _stopped_accepting(pid: int) -> bool:
    """An old worker that has closed its listening sockets (nginx retitles it first) or exited."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return not cmdline or b"shutting down" in cmdline  # empty: a zombie about to be reaped


def reload(state: StateDir, master: int, timeout: float = 15.0) -> None:
    """SIGHUP the master and return once only workers with the new config accept connections.

    nginx's reload is graceful: new workers start, old ones close their listening sockets, finish
    their in-flight requests and streams, then exit. Returning before the old ones stop accepting
    would let a connection made right after `allowed-ips add` meet the old rules. A failed reload
    shows as a new [emerg] line in error.log; the old workers then keep serving the old config.
    """
    before, offset = _children(master), _log_size(state)
    os.kill(master, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _children(master) - before and all(_stopped_accepting(pid) for pid in before):
            return
        emerg = _new_emerg(state, offset)
        if emerg:
            raise ProxyError(f"nginx refused the reload ({emerg}); it keeps the previous rules")
        time.sleep(0.02)
    raise ProxyError(f"nginx did not reload within {timeout:.0f} s: see {state.error_log}")


def apply_rules(state: StateDir, rules: AccessRules) -> bool:
    """Save `rules`, render, validate and, if a proxy runs from `state`, reload it gracefully.

    Returns whether a running proxy was reloaded. On any failure the previous config and rules
    stay in place (and keep running).
    """
    with state.locked():
        layout = state.read_layout()
        previous_rules = state.read_rules()
        previous_conf = install_config(state, render_config(state, layout, rules))
        state.write_rules(rules)
        master = running_master(state)
        if master is None:
            return False
        try:
            reload(state, master)
        except ProxyError:
            if previous_conf is not None:
                _write_atomic(state.conf, previous_conf)
            if previous_rules is not None:
                state.write_rules(previous_rules)
            raise
        return True


def reload_certificates(state: StateDir) -> bool:
    """Check the certificate files the running proxy names (replaced in place), then reload nginx
    gracefully so new connections get them; in-flight ones finish on the old. Returns whether a
    running proxy was reloaded. A bad pair is refused before nginx sees it."""
    with state.locked():
        layout = state.read_layout()
        if not layout.tls_cert:
            raise ProxyError(f"the serve of {state.path} has no TLS: restart it with --tls-cert/--tls-key "
                             "or --tls self-signed")
        check_pair(Path(layout.tls_cert), Path(layout.tls_key))
        check_config(state, state.conf)
        master = running_master(state)
        if master is None:
            return False
        reload(state, master)
        return True


@dataclass
class Proxy:
    """The nginx master for one serve; `stop()` lets in-flight requests finish first."""

    state: StateDir
    layout: ProxyLayout
    rules: AccessRules = field(default_factory=AccessRules)
    tls: TlsPair | None = None        # the checked pair the layout's tls_cert/tls_key name
    process: subprocess.Popen | None = None
    log_offset: int = field(default=0, repr=False)  # error.log size when this start began
    prepared: bool = field(default=False, repr=False)

    def prepare(self) -> None:
        """Write state and a validated config; fails before Triton is started if nginx would."""
        self.state.prepare()
        pid = running_master(self.state)
        if pid is not None:
            raise ProxyError(f"a proxy already runs from {self.state.path} (nginx pid {pid}): stop that serve "
                             "or pass another --state-dir / --http-port")
        self.state.pid_file.unlink(missing_ok=True)
        for address in self.layout.public_addresses:
            for port in (self.layout.http_port, self.layout.grpc_port):
                _check_free(address, port)
        with self.state.locked():
            self.state.write_layout(self.layout)
            self.state.write_rules(self.rules)
            install_config(self.state, render_config(self.state, self.layout, self.rules))
        self.prepared = True

    def start(self, timeout: float = 15.0) -> "Proxy":
        """Start nginx on the prepared config; return once both public ports accept connections."""
        if not self.prepared:
            self.prepare()
        self.log_offset = _log_size(self.state)
        out = open(self.state.logs / "nginx.out", "ab")
        self.process = subprocess.Popen(_nginx_args(self.state, self.state.conf), stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, preexec_fn=die_with_parent)
        out.close()
        self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ports = (self.layout.http_port, self.layout.grpc_port)
        host = _probe_host(self.layout.public_addresses[0])
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ProxyError(f"nginx exited at start ({self._error_hint()}): if a port is in use, "
                                 "choose other --http-port/--grpc-port")
            if all(_accepts(host, p) for p in ports) and running_master(self.state):
                return
            time.sleep(0.05)
        self.stop()
        raise ProxyError(f"nginx did not listen on ports {ports} within {timeout:.0f} s: see {self.state.error_log}")

    def _error_hint(self) -> str:
        """nginx's first complaint of this start, without its timestamp and pid prefix."""
        emerg = _new_emerg(self.state, self.log_offset)
        return emerg.split("[emerg] ", 1)[1].split(": ", 1)[-1] if emerg else f"see {self.state.error_log}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGQUIT (graceful: finish in-flight requests), then SIGTERM, then kill the group."""
        proc, self.process = self.process, None
        if proc is None:
            return
        stop_process_group(proc, ((signal.SIGQUIT, grace), (signal.SIGTERM, 5.0)))
        self.state.pid_file.unlink(missing_ok=True)


def _check_free(address: str, port: int) -> None:
    """Fail at once with the fix (nginx itself retries a busy port for 2.5 s, then says less)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx does
        try:
            s.bind((address, port))
        except OSError as e:
            raise ProxyError(f"cannot listen on {address} port {port} ({e.strerror}): "
                             "choose other --http-port/--grpc-port or --public-address") from None


def _probe_host(address: str) -> str:
    if address in ("0.0.0.0", ""):
        return "127.0.0.1"
    if address == "::":
        return "::1"
    return address


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False



