"""A real Prometheus (the Debian package's binary, `make test` installs it) scraping a serve with
the project's own deploy/monitoring/prometheus.yml (target and interval replaced), for tests; and
the queries of the Grafana dashboard, read from its JSON so a panel added later is checked too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import httpx
import yaml

from builder.serve.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "monitoring" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana" / "serverless-triton.json"


class Prometheus:
    """`prometheus` on a free loopback port, temp storage, scraping `target` every `interval`; always
    stopped (use as a context manager)."""

    def __init__(self, target: str, work: Path, interval: str = "1s"):
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed: `make test` installs the Debian package (apt-get install prometheus)"
        config = yaml.safe_load(CONFIG.read_text())
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = interval
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [target]}]
        work.mkdir(parents=True, exist_ok=True)
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params) -> dict | list:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {r.status_code} {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query at now: the vector's samples ({"metric": labels, "value": [t, "v"]})."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def target_health(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_) -> None:
        self.stop()


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> Iterator[dict]:
    """Every panel, those inside collapsed rows too."""
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in panels(board) for t in p.get("targets", []) if t.get("expr")]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables (`$name`, `${name}`) replaced; a variable nobody gave fails the test."""
    def value(m: re.Match) -> str:
        name = m[1] or m[2]
        assert name in values, f"the dashboard uses ${name}, which the test does not know: add it ({expr})"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)
