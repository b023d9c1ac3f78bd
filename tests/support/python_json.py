"""Run this interpreter in a child process whose answer is JSON: what a test checks there (a crash,
an import's side effects, an ISA cap through the environment) cannot reach the test's own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python_json(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
                timeout: float = 120) -> dict:
    """`python <args>` (a `-c` program or a `-m` module) at the repository root, with `env` added to
    this environment; it must exit 0; its last line of output is JSON, returned decoded."""
    proc = subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
