"""Refresh a running Triton from the store (load what changed), and the local cache serve pulls into."""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from backends.errors import ServeError
from builder.paths import cache_root
from builder.serve.storage.index import RepositoryIndex, parse_url, read_local_index
from builder.serve.storage.pulling import PullReport, pull
from builder.serve.storage.s3 import TransferSettings


@dataclass
class RefreshReport:
    pull: PullReport
    loaded: list[str] = field(default_factory=list)  # changed or new models (re)loaded into Triton
    unloaded: list[str] = field(default_factory=list)  # models gone from the repository
    not_loaded: list[str] = field(default_factory=list)  # changed, but not loaded now: next load sees them
    failed: dict[str, str] = field(default_factory=dict)  # model -> Triton's reason

    def summary(self) -> str:
        parts = [self.pull.summary()]
        for label, names in (("reloaded", self.loaded), ("unloaded", self.unloaded),
                             ("changed but not loaded", self.not_loaded)):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        if self.failed:
            parts.append("failed: " + "; ".join(f"{m}: {r}" for m, r in self.failed.items()))
        return "; ".join(parts)


def model_changes(old: RepositoryIndex | None, new: RepositoryIndex) -> tuple[list[str], list[str], list[str]]:
    """(added, changed, removed) top-level models. Without an old index every model counts as changed."""
    before, after = (old.model_digests() if old else {}), new.model_digests()
    if old is None:
        return [], sorted(after), []
    added = sorted(m for m in after if m not in before)
    changed = sorted(m for m in after if m in before and before[m] != after[m])
    removed = sorted(m for m in before if m not in after)
    return added, changed, removed


def _server(url: str) -> str:
    url = url.rstrip("/")
    return url if "://" in url else f"http://{url}"


def _post(url: str, body: dict, timeout: float) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _loaded_models(server: str) -> set[str]:
    try:
        status, body = _post(f"{server}/v2/repository/index", {}, 10)
    except (urllib.error.URLError, OSError) as e:
        raise ServeError(f"cannot reach Triton at {server} ({e}): is `serverless-triton serve` running "
                         "there? Pass its HTTP address with --server") from None
    if status != 200:
        raise ServeError(f"Triton at {server} answered {status} to its repository index: {body[:200]}")
    return {m["name"] for m in json.loads(body) if m.get("state") in ("READY", "LOADING")}


def _error_text(body: str) -> str:
    """Triton's reason on one line: a Python model's error arrives with an "At: file(line)" trace."""
    try:
        text = str(json.loads(body).get("error", body))
    except ValueError:
        text = body
    text = re.split(r"\n\s*At:\s*\n", text, maxsplit=1)[0]
    return " ".join(text.split())[:300]


def refresh(url: str, local_dir: Path, server_url: str, *, endpoint_url: str | None = None,
            quiet: bool = False, timeout: float = 600.0, settings: TransferSettings | None = None) -> RefreshReport:
    """Pull the new index into the served directory, then reload only the models that changed.

    Triton (explicit model control) keeps serving a model's old version until its new one is ready
    and never touches the others, so requests to unchanged models never fail.
    """
    server = _server(server_url)
    loaded_now = _loaded_models(server)  # fail before pulling if the server is not there
    old = read_local_index(Path(local_dir))
    report = RefreshReport(pull(url, local_dir, endpoint_url=endpoint_url, quiet=quiet, settings=settings))
    if not report.pull.changed:
        return report
    added, changed, removed = model_changes(old, report.pull.index)
    models = report.pull.index.model_digests()
    repaired = {rel.split("/")[0] for rel in report.pull.repaired} & set(models)
    changed = sorted(set(changed) | (repaired - set(added)))  # Triton may hold what the damaged file said
    for name in added + changed:
        if name not in loaded_now and name not in added:
            report.not_loaded.append(name)
            continue
        status, body = _post(f"{server}/v2/repository/models/{name}/load", {}, timeout)
        (report.loaded.append(name) if status == 200 else report.failed.__setitem__(name, _error_text(body)))
    for name in removed:
        if name in loaded_now:
            status, body = _post(f"{server}/v2/repository/models/{name}/unload",
                                 {"parameters": {"unload_dependents": False}}, timeout)
            (report.unloaded.append(name) if status == 200 else report.failed.__setitem__(name, _error_text(body)))
    return report


def default_cache_dir(url: str, endpoint_url: str | None) -> Path:
    """Where `serve --repository s3://...` keeps its local copy: one folder per store location."""
    loc = parse_url(url)
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
    tag = hashlib.sha256(f"{endpoint}|{loc}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{loc.bucket}-{loc.prefix}").strip("-")[:60]
    base = cache_root() / "repositories"
    return base / f"{slug}-{tag}"
