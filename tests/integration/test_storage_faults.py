"""Storage faults against the real S3-compatible test server (moto_server), injected on the wire by a
TCP forwarder that resets connections (tests/support/tcp_faults.py) or by another writer of the
store: an interrupted pull leaves the served repository untouched and says what failed, an
interrupted push leaves the index on the complete previous version, a same-size local edit is
noticed (with or without its mtime restored) and repaired by the next pull, `repo verify` names
each file that differs, a model that fails to load on refresh leaves its previous version serving,
and the swap says which mechanism it used."""

from __future__ import annotations

import os
import threading

import pytest
from click.testing import CliRunner
from test_storage import UPPER_MODEL, _pull, _push, _random_bytes, answers, digests, infer, make_repository, triton

from backends.errors import StorageError
from builder.cli import main
from builder.serve import storage
from builder.serve.ports import free_port
from builder.serve.storage import SWAP_EXCHANGE, SWAP_NEW, TransferSettings
from tests.support.tcp_faults import ResettingProxy

pytestmark = pytest.mark.alone   # connection resets on the wire: a parallel make test runs it alone

MiB = 1 << 20
WEIGHTS = "upper/1/data/weights.bin"


@pytest.fixture
def url(s3_env, s3_bucket) -> str:
    return f"s3://{s3_bucket}/models/prod"


@pytest.fixture
def deployed(tmp_path, url, s3_env):
    """v1 pushed and pulled into `dst`; returns (src, dst, v1 digests)."""
    src = make_repository(tmp_path / "src", big=2 * MiB)
    _push(src, url, s3_env)
    dst = tmp_path / "dst"
    assert _pull(url, dst, s3_env).swap == SWAP_NEW
    return src, dst, digests(dst)


@pytest.fixture
def cutter(s3_env):
    proxy = ResettingProxy(s3_env.port)
    try:
        yield proxy
    finally:
        proxy.close()


def add_shards(src, seed: int, n: int = 4, size: int = 3 * MiB) -> list[str]:
    """v2: n new multi-MiB files (what a partial transfer is most likely to cut)."""
    rels = [f"upper/1/data/shard-{i}.bin" for i in range(n)]
    for i, rel in enumerate(rels):
        (src / rel).write_bytes(_random_bytes(size, seed + i))
    return rels


# ------------------------------------------------------------------------ interrupted pulls

def test_a_connection_reset_mid_pull_keeps_the_repository_and_says_what_failed(deployed, url, s3_env, cutter):
    src, dst, v1 = deployed
    add_shards(src, 10)
    _push(src, url, s3_env)
    cutter.cut_after = 256 * 1024        # every response body is cut after 256 KiB, retries included
    with pytest.raises(StorageError) as e:
        storage.pull(url, dst, endpoint_url=cutter.endpoint, quiet=True)
    message = str(e.value)
    assert f"cannot reach the object store at {cutter.endpoint} while pulling from {url}" in message
    assert "run the command again (a pull resumes)" in message and cutter.resets > 0
    assert digests(dst) == v1
    cutter.cut_after = None
    report = storage.pull(url, dst, endpoint_url=cutter.endpoint, quiet=True)
    assert report.changed and digests(dst) == digests(src)


@pytest.mark.parametrize("index_too", [False, True], ids=["object-replaced", "push-in-progress"])
def test_an_object_changed_mid_pull_keeps_the_repository_and_is_named(deployed, url, s3_env, index_too):
    src, dst, v1 = deployed
    shards = add_shards(src, 20)
    _push(src, url, s3_env)
    bucket, last = url.split("/")[2], shards[-1]
    client, changed = s3_env.client(), threading.Event()

    def replace_the_last_object(_n: int) -> None:   # one transfer at a time: the last shard has not started
        if changed.is_set():
            return
        changed.set()
        client.put_object(Bucket=bucket, Key=f"models/prod/{last}", Body=_random_bytes(3 * MiB, 99))
        if index_too:
            index = client.get_object(Bucket=bucket, Key="models/prod/repository-index.json")["Body"].read()
            client.put_object(Bucket=bucket, Key="models/prod/repository-index.json", Body=index + b"\n")

    one_at_a_time = TransferSettings(concurrency=1)
    with pytest.raises(StorageError) as e:
        _pull(url, dst, s3_env, settings=one_at_a_time, progress=replace_the_last_object)
    if index_too:
        assert f"the repository at {url} changed during the pull (a push in progress?): run the pull again" \
            in str(e.value)
    else:
        assert f"checksum mismatch for {last} in {url}" in str(e.value) and "left unchanged" in str(e.value)
    assert changed.is_set() and digests(dst) == v1


def test_an_unreachable_store_keeps_the_repository(deployed, url):
    _, dst, v1 = deployed
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match=f"cannot reach the object store at {endpoint}"):
        storage.pull(url, dst, endpoint_url=endpoint, quiet=True)
    assert digests(dst) == v1


# ------------------------------------------------------------------------ interrupted push

def test_an_interrupted_push_leaves_the_index_on_the_complete_previous_version(deployed, url, s3_env, cutter,
                                                                              tmp_path):
    src, dst, v1 = deployed
    add_shards(src, 30)
    (src / "reverse" / "1" / "model.py").write_text("# v2 reverse\n")
    cutter.direction, cutter.cut_after = "up", 512 * 1024      # every upload is cut after 512 KiB
    with pytest.raises(StorageError, match=f"cannot reach the object store at {cutter.endpoint} while pushing"):
        storage.push(src, url, endpoint_url=cutter.endpoint, quiet=True)
    assert cutter.resets > 0
    fresh = tmp_path / "fresh"                                   # what any reader gets now: all of v1
    _pull(url, fresh, s3_env)
    assert digests(fresh) == v1
    assert _pull(url, dst, s3_env).changed is False and digests(dst) == v1
    cutter.cut_after = None
    storage.push(src, url, endpoint_url=cutter.endpoint, quiet=True)
    _pull(url, dst, s3_env)
    assert digests(dst) == digests(src)


def test_a_push_cut_off_after_its_commit_serves_the_new_version_from_its_blobs(deployed, url, s3_env, cutter,
                                                                              tmp_path):
    src, dst, v1 = deployed
    add_shards(src, 40, n=2)
    (src / "reverse" / "1" / "model.py").write_text("# v2 reverse\n")
    bucket = url.split("/")[2]
    cutter.trip_on = f"PUT /{bucket}/models/prod/repository-index.json".encode()   # path-style on loopback
    with pytest.raises(StorageError, match=f"cannot reach the object store at {cutter.endpoint} while pushing"):
        storage.push(src, url, endpoint_url=cutter.endpoint, quiet=True)
    assert cutter.tripped.is_set()
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert any(k.startswith("models/prod/.blobs/") for k in keys)           # cut before the blobs were settled
    report = _pull(url, dst, s3_env)                                        # the index names the blobs: all of v2
    assert report.changed and digests(dst) == digests(src)
    storage.push(src, url, endpoint_url=s3_env.endpoint, quiet=True)       # the next push settles and tidies
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert not any(k.startswith("models/prod/.blobs/") for k in keys)
    assert '"key"' not in s3_env.client().get_object(Bucket=bucket, Key="models/prod/repository-index.json")[
        "Body"].read().decode()
    fresh = tmp_path / "fresh"
    _pull(url, fresh, s3_env)
    assert digests(fresh) == digests(src) and digests(fresh) != v1


# ------------------------------------------------------------- local changes, verify, repair

def edit_in_place(path, restore_mtime: bool) -> None:
    """Flip one byte: same size; with restore_mtime, the old mtime put back as well (bit rot looks so)."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    if restore_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert after.st_size == before.st_size and after.st_ino == before.st_ino
    assert (after.st_mtime_ns == before.st_mtime_ns) == restore_mtime


@pytest.mark.parametrize("restore_mtime", [True, False], ids=["mtime-restored", "mtime-moved"])
def test_a_same_size_local_edit_is_reported_by_verify_and_repaired_by_the_next_pull(deployed, url, s3_env,
                                                                                    restore_mtime):
    _, dst, v1 = deployed
    assert storage.verify(dst).ok
    edit_in_place(dst / WEIGHTS, restore_mtime)
    report = storage.verify(dst)
    assert report.changed == [WEIGHTS] and not report.missing and not report.extra
    cli = CliRunner().invoke(main, ["repo", "verify", str(dst)])
    assert cli.exit_code == 1 and f"changed  {WEIGHTS}\n" in cli.output
    assert cli.output.splitlines()[-1].startswith(f"Error: {dst}: 1 of ") and "repo pull" in cli.output

    pulled = _pull(url, dst, s3_env)             # nothing changed in the store: only the local damage
    assert pulled.changed and pulled.repaired == [WEIGHTS] and pulled.files_downloaded == 1
    assert f"repaired 1 local files changed since the last pull: {WEIGHTS}" in pulled.summary()
    assert digests(dst) == v1 and storage.verify(dst).ok
    assert _pull(url, dst, s3_env).changed is False


def test_a_touched_but_intact_file_is_rehashed_and_kept(deployed, url, s3_env):
    _, dst, v1 = deployed
    os.utime(dst / WEIGHTS)                     # stat changed, bytes did not
    report = _pull(url, dst, s3_env)
    assert report.changed is False and report.repaired == [] and digests(dst) == v1


def test_verify_names_missing_and_extra_files(deployed):
    _, dst, _ = deployed
    (dst / "reverse" / "1" / "model.py").unlink()
    (dst / "upper" / "1" / "stray.txt").write_text("left here by hand")
    (dst / "upper" / "1" / "__pycache__").mkdir()           # Triton's own: not a difference
    (dst / "upper" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    report = storage.verify(dst)
    assert report.missing == ["reverse/1/model.py"] and report.extra == ["upper/1/stray.txt"] and not report.changed
    assert report.lines() == ["missing  reverse/1/model.py", "extra    upper/1/stray.txt"]


def test_verify_of_a_built_repository_uses_its_manifest(tiny_repository):
    report = storage.verify(tiny_repository)
    assert report.ok and report.reference == "manifest.json" and report.files_checked > 5


def test_verify_without_a_reference_says_so(tmp_path):
    result = CliRunner().invoke(main, ["repo", "verify", str(tmp_path)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "has neither repository-index.json (written by `repo pull`) nor manifest.json" in result.output


# ------------------------------------------------------------------------------- the swap

def test_the_swap_is_one_renameat2_exchange(deployed, url, s3_env, tmp_path):
    src, dst, _ = deployed
    (src / "reverse" / "1" / "model.py").write_text("# v2\n")
    _push(src, url, s3_env)
    inode = dst.stat().st_ino
    report = _pull(url, dst, s3_env)
    assert report.swap == SWAP_EXCHANGE and "briefly absent" not in report.summary()
    previous = tmp_path / ".dst.sync" / "previous"
    assert previous.stat().st_ino == inode and dst.stat().st_ino != inode   # the two directories traded places


# ----------------------------------------------------------------- refresh with a failed load

BROKEN_UPPER = UPPER_MODEL.replace("    def initialize(self, args):\n",
                                   "    def initialize(self, args):\n        raise RuntimeError('broken v2')\n")


@pytest.mark.slow
def test_a_failed_load_on_refresh_keeps_the_previous_version_serving(deployed, url, s3_env, cache_dir, tmp_path):
    src, dst, _ = deployed
    with triton(dst, cache_dir, tmp_path / "triton.log") as server:
        before = answers(server.http_url)
        assert before["upper"][0].startswith("HELLO|v1|")
        (src / "upper" / "1" / "model.py").write_text(BROKEN_UPPER.format(tag="v2"))
        _push(src, url, s3_env)
        cli = CliRunner().invoke(main, ["repo", "refresh", url, str(dst), "--server", server.http_url,
                                        "--endpoint-url", s3_env.endpoint, "-q"])
        assert cli.exit_code == 1 and cli.output.count("\n") == 1, cli.output
        assert "models failed to load (their previous version keeps serving): upper: " in cli.output
        assert "broken v2" in cli.output
        assert answers(server.http_url) == before                     # v1 still answers, ensemble included
        (src / "upper" / "1" / "model.py").write_text(UPPER_MODEL.format(tag="v3"))
        _push(src, url, s3_env)
        report = storage.refresh(url, dst, server.http_url, endpoint_url=s3_env.endpoint, quiet=True)
        assert report.loaded == ["upper"] and not report.failed
        assert infer(server.http_url, "upper", ["a"])[0].startswith("A|v3|")
