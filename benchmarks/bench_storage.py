"""Push and pull throughput: `serverless-triton repo push/pull` vs `aws s3 sync`, same store, same run.

One moto S3 server on loopback (no credential checks, so both tools pay the same per-request cost)
and one ~300 MB repository shaped like a real one: three engine-sized files, a dozen medium
shards, and a few hundred small files (configs, tokenizer parts, Python). Both tools run as
subprocesses (each pays its interpreter start), with the same 10 transfers in flight and 8 MiB
parts. Every round pushes to a fresh prefix / pulls into an empty directory, so nothing is skipped;
one extra pair times a no-op re-push of an unchanged repository.
Goal: ours at least as fast as aws s3 sync, while also hashing and verifying every file. Nothing
asserts timings.

    .venv/bin/python -m pytest benchmarks/bench_storage.py --benchmark-only -q
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _test_helpers():
    """tests/conftest.py under its own name (`conftest` here is benchmarks/conftest.py)."""
    name = "storage_test_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "conftest.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


free_port, start_s3_server = _test_helpers().free_port, _test_helpers().start_s3_server

MiB = 1 << 20
ROUNDS = 3
BUCKET = "bench"
AWS = Path(sys.executable).parent / "aws"
OURS = [sys.executable, "-c", "from builder.repo_cli import repo; repo()"]
_counter = itertools.count()


def make_repository(root: Path) -> int:
    """~300 MB: 3 large + 12 medium + 300 small files; returns the total size in bytes."""
    rng = np.random.default_rng(0)
    sizes = {f"llm-int8/1/rank0.engine": 120 * MiB, f"llm-fp16/1/rank0.engine": 100 * MiB,
             f"embed/1/model.bin": 30 * MiB}
    sizes |= {f"llm-fp16/1/shards/part-{i:02d}.bin": 4 * MiB for i in range(12)}
    sizes |= {f"tokenizer-{i % 6}/1/files/f{i:03d}.json": int(rng.integers(1_000, 64_000)) for i in range(300)}
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return sum(sizes.values())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    server = start_s3_server(free_port(), log=tmp_path_factory.mktemp("moto") / "moto.log")
    server.client().create_bucket(Bucket=BUCKET)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("bench-repo") / "repo"
    return root, make_repository(root)


@pytest.fixture(scope="module")
def env(store) -> dict[str, str]:
    return {**os.environ, **store.env(), "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": store.endpoint}


@pytest.fixture(scope="module")
def pulled_prefix(store, repository, env) -> str:
    """One push by our tool that every pull round reads (both tools pull the same objects)."""
    url = f"s3://{BUCKET}/source"
    _run(OURS + ["push", str(repository[0]), url, "-q"], env)
    return url


@pytest.fixture(scope="module")
def figures(request):
    results: dict[str, float] = {}
    yield results
    write = request.config.pluginmanager.get_plugin("terminalreporter").write_line
    write("")
    write("storage throughput (MB/s = MiB per second of mean wall time, subprocess included):")
    for op in ("push", "pull", "re-push unchanged"):
        ours, aws = results.get(f"{op} ours"), results.get(f"{op} aws")
        if ours and aws:
            if op == "re-push unchanged":
                write(f"  {op:<18} ours {ours:6.2f} s   aws s3 sync {aws:6.2f} s")
            else:
                write(f"  {op:<18} ours {ours:6.0f} MB/s   aws s3 sync {aws:6.0f} MB/s   ratio {ours / aws:4.2f}")


def _run(cmd: list[str], env: dict[str, str]) -> None:
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _ours_push(src: Path, url: str) -> list[str]:
    return OURS + ["push", str(src), url, "-q"]


def _aws_sync(src: str, dst: str) -> list[str]:
    return [str(AWS), "s3", "sync", src, dst, "--only-show-errors", "--no-progress"]


def _fresh_prefix() -> str:
    return f"s3://{BUCKET}/round-{next(_counter)}"


@pytest.mark.parametrize("tool", ["ours", "aws"])
def test_push(benchmark, tool, repository, env, figures):
    src, total = repository

    def setup():
        url = _fresh_prefix()
        cmd = _ours_push(src, url) if tool == "ours" else _aws_sync(str(src), url)
        return (cmd, env), {}

    benchmark.pedantic(_run, setup=setup, rounds=ROUNDS, iterations=1)
    figures[f"push {tool}"] = total / MiB / benchmark.stats.stats.mean
    benchmark.extra_info["MB/s"] = round(figures[f"push {tool}"], 1)


@pytest.mark.parametrize("tool", ["ours", "aws"])
def test_pull(benchmark, tool, repository, pulled_prefix, env, figures, tmp_path):
    _, total = repository
    targets = []

    def setup():
        dst = tmp_path / f"pull-{next(_counter)}"
        targets.append(dst)
        if len(targets) > 1:  # keep the disk small: drop the previous round's copy
            shutil.rmtree(targets[-2], ignore_errors=True)
            shutil.rmtree(targets[-2].parent / f".{targets[-2].name}.sync", ignore_errors=True)
        cmd = OURS + ["pull", pulled_prefix, str(dst), "-q"] if tool == "ours" else _aws_sync(pulled_prefix, str(dst))
        return (cmd, env), {}

    benchmark.pedantic(_run, setup=setup, rounds=ROUNDS, iterations=1)
    figures[f"pull {tool}"] = total / MiB / benchmark.stats.stats.mean
    benchmark.extra_info["MB/s"] = round(figures[f"pull {tool}"], 1)


@pytest.mark.parametrize("tool", ["ours", "aws"])
def test_repush_unchanged(benchmark, tool, repository, env, figures):
    src, _ = repository
    url = _fresh_prefix()
    cmd = _ours_push(src, url) if tool == "ours" else _aws_sync(str(src), url)
    _run(cmd, env)  # the first push; the timed ones find everything in place
    benchmark.pedantic(_run, args=(cmd, env), rounds=ROUNDS, iterations=1)
    figures[f"re-push unchanged {tool}"] = benchmark.stats.stats.mean
