"""Talking to a running serve from another shell: its gateway's deployment states, and waking or
unloading one deployment (scale to zero). The serve is found by its state directory, as the
`allowed-ips` and `api-keys` commands find it; the gateway's admin routes listen on loopback and
nginx never routes them."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from backends.errors import InvalidArgumentError, ServeError
from builder.serve.proxy import StateDir


def _gateway(state: Path) -> str:
    layout = StateDir(Path(state)).read_layout()
    if not layout.gateway:
        raise ServeError(f"the serve of {state} runs no gateway (started before it had one): restart it")
    return f"http://{layout.gateway}"


def _call(state: Path, method: str, path: str, timeout: float) -> dict:
    url = _gateway(state) + path
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        raise (InvalidArgumentError if e.code in (404, 409) else ServeError)(message) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise ServeError(f"no serve answers at {url} ({getattr(e, 'reason', e)}): is `serverless-triton serve` "
                         f"running with this --http-port / --state-dir?") from None


def deployment_states(state: Path) -> list[dict]:
    """One dict per deployment: model, state, last_request, in_flight, idle_timeout, cold_starts, ..."""
    return _call(state, "GET", "/admin/deployments", 10)["deployments"]


def act(state: Path, model: str, action: str, timeout: float = 600) -> dict:
    """`wake` (load now, wait until it is loaded) or `unload` a deployment named name:precision."""
    return _call(state, "POST", f"/admin/deployments/{urllib.parse.quote(model, safe=':')}/{action}", timeout)
