"""Push and pull throughput: `serverless-triton repo push/pull` vs `aws s3 sync`, same store, same run.

One moto S3 server on loopback (no credential checks, so both tools pay the same per-request cost)
and one ~300 MB repository shaped like a real one: three engine-sized files, a dozen medium
shards, and a few hundred small files (configs, tokenizer parts, Python). Both tools run as
subprocesses (each pays its interpreter start), with the same 10 transfers in flight and 8 MiB
parts. Every round pushes to a fresh prefix / pulls into an empty directory, so nothing is skipped;
one extra pair times a no-op re-push of an unchanged repository. Both tools warm up once first, and
each round's objects are deleted afterwards (untimed), so no round pays for the ones before it.
Goal: ours at least as fast as aws s3 sync, while also hashing and verifying every file. Nothing
asserts timings.

    .venv/bin/python -m pytest benchmarks/bench_storage.py --benchmark-only -q
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from builder.serve.ports import free_port
from tests.support.machine import cpu_description
from tests.support.s3 import start_s3_server

ROOT = Path(__file__).resolve().parent.parent


MiB = 1 << 20
ROUNDS = 3
BUCKET = "bench"
AWS = Path(sys.executable).parent / "aws"
OURS = [sys.executable, "-c", "from builder.cli.repo import repo; repo()"]
_counter = itertools.count()


def make_repository(root: Path) -> int:
    """~300 MB: 3 large + 12 medium + 300 small files; returns the total size in bytes."""
    rng = np.random.default_rng(0)
    sizes = {"llm-int8/1/rank0.engine": 120 * MiB, "llm-fp16/1/rank0.engine": 100 * MiB,
             "embed/1/model.bin": 30 * MiB}
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
def warm_store(store, repository, env, tmp_path_factory):
    """Each tool pushes and pulls once untimed, so neither pays for a cold store or cold caches."""
    warm = tmp_path_factory.mktemp("warm-up")
    for tool in ("ours", "aws"):
        url = _fresh_prefix()
        _run(_push_cmd(tool, repository[0], url), env)
        _run(_pull_cmd(tool, url, warm / tool), env)
        _clear(store, url)
    shutil.rmtree(warm)
    return store


@pytest.fixture(scope="module")
def pulled_prefix(warm_store, repository, env) -> str:
    """One push by our tool that every pull round reads (both tools pull the same objects)."""
    url = f"s3://{BUCKET}/source"
    _run(_push_cmd("ours", repository[0], url), env)
    return url


@pytest.fixture(scope="module")
def figures(request):
    results: dict[str, tuple[float, float]] = {}
    yield results
    plugins = request.config.pluginmanager
    write = plugins.get_plugin("terminalreporter").write_line
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        write("")
        write(f"storage: best round (mean), subprocess start included; CPU: {cpu_description()}")
        for op in ("push", "pull", "re-push unchanged"):
            ours, aws = results.get(f"{op} ours"), results.get(f"{op} aws")
            if ours and aws:
                unit = "s" if op == "re-push unchanged" else "MiB/s"
                write(f"  {op:<18} ours {ours[0]:6.1f} ({ours[1]:6.1f}) {unit}   "
                      f"aws s3 sync {aws[0]:6.1f} ({aws[1]:6.1f}) {unit}")


def _throughput(benchmark, figures: dict, name: str, total: int) -> None:
    """MiB/s of the best round (other jobs on a shared host only ever slow a round down) and the mean."""
    stats = benchmark.stats.stats
    figures[name] = (total / MiB / stats.min, total / MiB / stats.mean)
    benchmark.extra_info["MiB/s best"] = round(figures[name][0], 1)
    benchmark.extra_info["MiB/s mean"] = round(figures[name][1], 1)
    benchmark.extra_info["cpu"] = cpu_description()


def _run(cmd: list[str], env: dict[str, str]) -> None:
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _aws_sync(src: str, dst: str) -> list[str]:
    return [str(AWS), "s3", "sync", src, dst, "--only-show-errors", "--no-progress"]


def _push_cmd(tool: str, src: Path, url: str) -> list[str]:
    return OURS + ["push", str(src), url, "-q"] if tool == "ours" else _aws_sync(str(src), url)


def _pull_cmd(tool: str, url: str, dst: Path) -> list[str]:
    return OURS + ["pull", url, str(dst), "-q"] if tool == "ours" else _aws_sync(url, str(dst))


def _fresh_prefix() -> str:
    return f"s3://{BUCKET}/round-{next(_counter)}"


def _clear(store, url: str) -> None:
    """Delete a round's objects (untimed), so the in-memory store does not grow round after round."""
    client, prefix = store.client(), url.split("/", 3)[3] + "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})


@pytest.mark.parametrize("tool", ["ours", "aws"])
def test_push(benchmark, tool, warm_store, repository, env, figures):
    src, total = repository
    urls: list[str] = []

    def setup():
        if urls:
            _clear(warm_store, urls[-1])
        urls.append(_fresh_prefix())
        return (_push_cmd(tool, src, urls[-1]), env), {}

    benchmark.pedantic(_run, setup=setup, rounds=ROUNDS, iterations=1)
    _clear(warm_store, urls[-1])
    _throughput(benchmark, figures, f"push {tool}", total)


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
        return (_pull_cmd(tool, pulled_prefix, dst), env), {}

    benchmark.pedantic(_run, setup=setup, rounds=ROUNDS, iterations=1)
    _throughput(benchmark, figures, f"pull {tool}", total)


@pytest.mark.parametrize("tool", ["ours", "aws"])
def test_repush_unchanged(benchmark, tool, store, repository, env, figures):
    src, _ = repository
    url = _fresh_prefix()
    cmd = _push_cmd(tool, src, url)
    _run(cmd, env)  # the first push; the timed ones find everything in place
    benchmark.pedantic(_run, args=(cmd, env), rounds=ROUNDS, iterations=1)
    _clear(store, url)
    figures[f"re-push unchanged {tool}"] = (benchmark.stats.stats.min, benchmark.stats.stats.mean)
