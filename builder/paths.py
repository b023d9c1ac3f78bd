"""Where serverless-triton keeps what it can rebuild: one cache root for every command."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/serverless-triton` (default `~/.cache/serverless-triton`): converted
    checkpoints, fp32 exports, Triton's backend directory, serve state, hash caches."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "serverless-triton"
