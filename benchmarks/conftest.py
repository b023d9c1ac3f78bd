"""Benchmarks reuse the test helpers (tests/conftest.py fixtures are not visible from here)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
