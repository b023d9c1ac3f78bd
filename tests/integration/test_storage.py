"""Object-storage sync against a real S3-compatible server (moto's server mode on loopback).

The repository is a tiny Triton Python-backend one written here: `upper` (uppercases a BYTES
tensor and appends a tag plus the digest of its data file, so a served answer proves which files
were pulled), `reverse`, and `pipeline`, an ensemble over `upper` whose version folder is empty
(S3 has no folders, so the index must carry it). A 12 MiB data file exercises multipart.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT

from backends.contract.manifest import Manifest
from backends.errors import StorageError
from builder.cli import main
from builder.serve import storage
from builder.serve.ports import free_port, free_ports
from builder.serve.storage import INDEX_NAME, TransferSettings
from builder.serve.triton_server import DRAINED_EXIT_TIMEOUT_S, Ports, TritonServer
from tests.support.s3 import start_s3_server

MiB = 1 << 20

UPPER_MODEL = '''
import hashlib
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

TAG = "{tag}"


class TritonPythonModel:
    def initialize(self, args):
        data = Path(args["model_repository"]) / args["model_version"] / "data" / "weights.bin"
        self.digest = hashlib.sha256(data.read_bytes()).hexdigest()[:8]

    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            out = [f"{{t.decode().upper()}}|{{TAG}}|{{self.digest}}".encode() for t in text]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("out", np.array(out, dtype=object))]))
        return responses
'''

REVERSE_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            out = [t.decode()[::-1].encode() for t in text]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("out", np.array(out, dtype=object))]))
        return responses
'''

PY_CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "text" data_type: TYPE_STRING dims: [ -1 ] }} ]
output [ {{ name: "out" data_type: TYPE_STRING dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
'''

ENSEMBLE_CONFIG = '''name: "pipeline"
platform: "ensemble"
max_batch_size: 0
input [ { name: "text" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "out" data_type: TYPE_STRING dims: [ -1 ] } ]
ensemble_scheduling { step [ { model_name: "upper" model_version: -1
  input_map { key: "text" value: "text" } output_map { key: "out" value: "out" } } ] }
'''


def _random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def make_repository(root: Path, *, tag: str = "v1", seed: int = 1, big: int = 12 * MiB) -> Path:
    """A three-model Triton repository with a large data file and a few small ones."""
    (root / "upper" / "1" / "data").mkdir(parents=True, exist_ok=True)
    (root / "upper" / "config.pbtxt").write_text(PY_CONFIG.format(name="upper"))
    (root / "upper" / "1" / "model.py").write_text(UPPER_MODEL.format(tag=tag))
    (root / "upper" / "1" / "data" / "weights.bin").write_bytes(_random_bytes(big, seed))
    for i in range(5):
        (root / "upper" / "1" / "data" / f"vocab-{i}.txt").write_text(f"token{i}\n" * 1000)
    (root / "reverse" / "1").mkdir(parents=True, exist_ok=True)
    (root / "reverse" / "config.pbtxt").write_text(PY_CONFIG.format(name="reverse"))
    (root / "reverse" / "1" / "model.py").write_text(REVERSE_MODEL)
    (root / "pipeline" / "1").mkdir(parents=True, exist_ok=True)
    (root / "pipeline" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    (root / "manifest.json").write_text(Manifest("serverless-triton test").to_json())   # hand-made: no deployments
    return root


def digests(root: Path) -> dict[str, str]:
    """Every file's sha256 (caches and our index left out) plus the empty folders: what a pull must reproduce."""
    index = storage.scan_local(root)
    return {**{p: e.sha256 for p, e in index.files.items()}, **{d + "/": "dir" for d in index.dirs}}


def infer(http: str, model: str, texts: list[str]) -> list[str]:
    body = json.dumps({"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]})
    req = urllib.request.Request(f"http://{http}/v2/models/{model}/infer", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["outputs"][0]["data"]


def answers(http: str) -> dict[str, list[str]]:
    texts = ["hello", "Grüße", "triton"]
    return {m: infer(http, m, texts) for m in ("upper", "reverse", "pipeline")}


def triton(repository: Path, cache_dir: Path, log: Path) -> TritonServer:
    """Stopped once every request has answered: the short exit timeout spares the 15 s tritonserver
    otherwise waits for a model whose reload failed (test_storage_faults)."""
    return TritonServer(repository, Ports(*free_ports(3)), cache_dir=cache_dir, log_path=log,
                        exit_timeout_s=DRAINED_EXIT_TIMEOUT_S)


@pytest.fixture
def url(s3_env, s3_bucket) -> str:
    return f"s3://{s3_bucket}/models/prod"


def _push(src: Path, url: str, server, **kw) -> storage.PushReport:
    return storage.push(src, url, endpoint_url=server.endpoint, quiet=True, **kw)


def _pull(url: str, dst: Path, server, **kw) -> storage.PullReport:
    return storage.pull(url, dst, endpoint_url=server.endpoint, quiet=True, **kw)


# ------------------------------------------------------------------------------- round trip

@pytest.mark.slow
def test_round_trip_serves_the_same_answers(tmp_path, url, s3_env, cache_dir):
    src = make_repository(tmp_path / "src")
    pushed = _push(src, url, s3_env)
    assert pushed.files_uploaded == len(storage.scan_local(src).files) and pushed.files_skipped == 0
    dst = tmp_path / "served"
    pulled = _pull(url, dst, s3_env)
    assert pulled.changed and pulled.files_downloaded == pushed.files_uploaded
    assert digests(dst) == digests(src)
    assert (dst / "pipeline" / "1").is_dir()  # an empty folder survives the trip

    with triton(src, cache_dir, tmp_path / "src.log") as server:
        expected = answers(server.http_url)
    with triton(dst, cache_dir, tmp_path / "dst.log") as server:
        assert answers(server.http_url) == expected
    assert expected["upper"][0].startswith("HELLO|v1|")


def test_pull_into_an_existing_pull_is_a_no_op(tmp_path, url, s3_env):
    src = make_repository(tmp_path / "src")
    _push(src, url, s3_env)
    _pull(url, tmp_path / "dst", s3_env)
    again = _pull(url, tmp_path / "dst", s3_env)
    assert not again.changed and again.files_downloaded == 0


# ----------------------------------------------------------------------- incremental pushes

def test_repushing_an_unchanged_repository_uploads_nothing(tmp_path, url, s3_env):
    src = make_repository(tmp_path / "src")
    first = _push(src, url, s3_env)
    second = _push(src, url, s3_env)
    assert second.files_uploaded == 0 and second.bytes_uploaded == 0
    assert second.files_skipped == first.files_uploaded


def test_changing_one_model_uploads_only_its_files(tmp_path, url, s3_env):
    src = make_repository(tmp_path / "src")
    _push(src, url, s3_env)
    (src / "reverse" / "1" / "model.py").write_text(REVERSE_MODEL + "\n# v2\n")
    (src / "reverse" / "1" / "extra.txt").write_text("new file")
    report = _push(src, url, s3_env)
    assert report.uploaded == ["reverse/1/extra.txt", "reverse/1/model.py"]
    stored = s3_env.client().get_object(Bucket=url.split("/")[2], Key="models/prod/" + INDEX_NAME)
    index = json.loads(stored["Body"].read())
    assert {f["path"] for f in index["files"]} == set(storage.scan_local(src).files)


def test_an_object_changed_behind_our_back_is_uploaded_again(tmp_path, url, s3_env):
    src = make_repository(tmp_path / "src")
    _push(src, url, s3_env)
    bucket = url.split("/")[2]
    s3_env.client().put_object(Bucket=bucket, Key="models/prod/reverse/1/model.py", Body=b"tampered")
    assert _push(src, url, s3_env).uploaded == ["reverse/1/model.py"]


def test_an_interrupted_push_is_completed_without_reuploading(tmp_path, url, s3_env):
    """Objects uploaded by a push that never wrote its index are recognised by their sha256 metadata."""
    src = make_repository(tmp_path / "src")
    _push(src, url, s3_env)
    s3_env.client().delete_object(Bucket=url.split("/")[2], Key="models/prod/" + INDEX_NAME)
    report = _push(src, url, s3_env)
    assert report.files_uploaded == 0
    _pull(url, tmp_path / "dst", s3_env)
    assert digests(tmp_path / "dst") == digests(src)


def test_push_delete_removes_stale_objects_but_not_neighbours(tmp_path, s3_env, s3_bucket):
    src = make_repository(tmp_path / "src")
    _push(src, f"s3://{s3_bucket}/models/prod", s3_env)
    _push(src, f"s3://{s3_bucket}/models/prod2", s3_env)
    (src / "reverse" / "1" / "model.py").unlink()
    report = _push(src, f"s3://{s3_bucket}/models/prod", s3_env, delete=True)
    assert report.objects_deleted == 1
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "models/prod/reverse/1/model.py" not in keys and "models/prod2/reverse/1/model.py" in keys


# ------------------------------------------------------------------------------------ pulls

def test_pull_downloads_only_what_changed_and_keeps_the_previous_version(tmp_path, url, s3_env):
    src = make_repository(tmp_path / "src")
    _push(src, url, s3_env)
    dst = tmp_path / "dst"
    _pull(url, dst, s3_env)
    (src / "reverse" / "1" / "model.py").write_text(REVERSE_MODEL + "\n# v2\n")
    _push(src, url, s3_env)
    report = _pull(url, dst, s3_env)
    assert report.files_downloaded == 1 and report.files_reused == len(storage.scan_local(src).files) - 1
    assert digests(dst) == digests(src)
    previous = tmp_path / ".dst.sync" / "previous"
    assert "# v2" not in (previous / "reverse" / "1" / "model.py").read_text()
    # unchanged files are hard links, not copies
    assert (dst / "upper/1/data/weights.bin").stat().st_ino == (previous / "upper/1/data/weights.bin").stat().st_ino


def test_pull_over_a_plain_directory_keeps_the_original(tmp_path, url, s3_env):
    src = make_repository(tmp_path / "src")
    _push(src, url, s3_env)
    dst = make_repository(tmp_path / "dst", tag="local")  # e.g. built here, never pulled
    (dst / "mine.txt").write_text("my notes")
    report = _pull(url, dst, s3_env)
    assert digests(dst) == digests(src) and not (dst / "mine.txt").exists()
    assert report.files_reused > 0 and report.files_downloaded == 1  # only upper/1/model.py differs
    originals = list((tmp_path / ".dst.sync").glob("original-*"))
    assert len(originals) == 1 and (originals[0] / "mine.txt").read_text() == "my notes"


def test_pull_of_a_missing_repository_says_so(tmp_path, url, s3_env):
    with pytest.raises(StorageError, match="no repository at s3://.*push one first"):
        _pull(url, tmp_path / "dst", s3_env)
    assert not (tmp_path / "dst").exists()


# ----------------------------------------------------------------------------------- faults

@pytest.fixture
def deployed(tmp_path, url, s3_env):
    """v1 pushed and pulled into `dst`; returns (src, dst, v1 digests)."""
    src = make_repository(tmp_path / "src")
    _push(src, url, s3_env)
    dst = tmp_path / "dst"
    _pull(url, dst, s3_env)
    return src, dst, digests(dst)


def test_a_corrupted_object_fails_the_pull_and_names_the_file(deployed, url, s3_env, tmp_path):
    src, dst, v1 = deployed
    make_repository(src, tag="v2", seed=2)
    _push(src, url, s3_env)
    bucket = url.split("/")[2]
    size = (src / "upper/1/data/weights.bin").stat().st_size
    s3_env.client().put_object(Bucket=bucket, Key="models/prod/upper/1/data/weights.bin", Body=b"\0" * size)
    with pytest.raises(StorageError, match=r"checksum mismatch for upper/1/data/weights.bin .*re-push"):
        _pull(url, dst, s3_env)
    assert digests(dst) == v1
    assert not (tmp_path / ".dst.sync" / "staging" / "upper/1/data/weights.bin").exists()


def test_an_object_missing_from_the_store_is_named(deployed, url, s3_env):
    src, dst, v1 = deployed
    (src / "reverse" / "1" / "model.py").write_text("# v2\n")
    _push(src, url, s3_env)
    s3_env.client().delete_object(Bucket=url.split("/")[2], Key="models/prod/reverse/1/model.py")
    with pytest.raises(StorageError, match="reverse/1/model.py is listed .* but missing"):
        _pull(url, dst, s3_env)
    assert digests(dst) == v1


@pytest.mark.parametrize("evil", ["../escaped.txt", "/tmp/escaped-abs.txt", "upper/../../escaped.txt"])
def test_an_index_with_a_traversal_key_is_refused(deployed, url, s3_env, tmp_path, evil):
    src, dst, v1 = deployed
    bucket = url.split("/")[2]
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="models/prod/" + evil, Body=b"pwned")
    index = json.loads(client.get_object(Bucket=bucket, Key="models/prod/" + INDEX_NAME)["Body"].read())
    index["files"].append({"path": evil, "size": 5, "sha256": hashlib.sha256(b"pwned").hexdigest()})
    client.put_object(Bucket=bucket, Key="models/prod/" + INDEX_NAME, Body=json.dumps(index).encode())
    with pytest.raises(StorageError, match="refusing path"):
        _pull(url, dst, s3_env)
    assert digests(dst) == v1
    assert not list(tmp_path.rglob("escaped*")) and not Path("/tmp/escaped-abs.txt").exists()


def test_wrong_credentials_are_reported_without_the_secret(deployed, url, s3_env, monkeypatch):
    src, dst, v1 = deployed
    make_repository(src, tag="v2", seed=2)
    _push(src, url, s3_env)
    bad_secret = "not-the-secret-" + "x" * 24
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    with pytest.raises(StorageError, match=r"refused the credentials \(SignatureDoesNotMatch\)") as e:
        _pull(url, dst, s3_env)
    assert bad_secret not in str(e.value) and s3_env.secret_key not in str(e.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    with pytest.raises(StorageError, match=r"refused the credentials \(InvalidAccessKeyId\)"):
        _push(src, url, s3_env)
    assert digests(dst) == v1


def test_missing_credentials_say_how_to_provide_them(tmp_path, url, s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no usable credentials .* AWS_ACCESS_KEY_ID"):
        _pull(url, tmp_path / "dst", s3_env)


def test_a_missing_bucket_is_reported(tmp_path, s3_env):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist .*create it"):
        _push(make_repository(tmp_path / "src"), "s3://no-such-bucket/x", s3_env)


def test_an_unreachable_endpoint_is_reported(tmp_path, s3_env):
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match=f"cannot reach the object store at {endpoint}"):
        storage.pull("s3://models/x", tmp_path / "dst", endpoint_url=endpoint, quiet=True)


def test_the_store_dying_mid_pull_keeps_the_old_repository_and_the_next_pull_resumes(tmp_path, monkeypatch):
    """Kill the store once half of the new version has arrived, restart it, pull again."""
    port = free_port()
    store = start_s3_server(port)
    for k, v in store.env().items():
        monkeypatch.setenv(k, v)
    url, dst = "s3://models/prod", tmp_path / "dst"
    src = make_repository(tmp_path / "src", big=1 * MiB)
    shards = [src / "upper" / "1" / "data" / f"shard-{i}.bin" for i in range(6)]
    try:
        store.client().create_bucket(Bucket="models")
        _push(src, url, store)
        _pull(url, dst, store)
        v1 = digests(dst)
        for i, shard in enumerate(shards):  # v2: six new 4 MiB files
            shard.write_bytes(_random_bytes(4 * MiB, 100 + i))
        _push(src, url, store)

        received, killed = [0], threading.Event()

        def kill_halfway(n: int) -> None:
            received[0] += n
            if received[0] >= 12 * MiB and not killed.is_set():
                killed.set()
                store.kill()

        slow = TransferSettings(concurrency=2)
        with pytest.raises(StorageError, match=f"cannot reach the object store at http://127.0.0.1:{port}"):
            _pull(url, dst, store, settings=slow, progress=kill_halfway)
        assert killed.is_set() and digests(dst) == v1

        store = start_s3_server(port)  # an empty store again: push v2 once more
        store.client().create_bucket(Bucket="models")
        _push(src, url, store)
        report = _pull(url, dst, store)
        assert report.files_resumed >= 1 and report.bytes_downloaded < 6 * 4 * MiB
        assert report.files_resumed + report.files_downloaded == 6
        assert digests(dst) == digests(src)
        assert not (tmp_path / ".dst.sync" / "staging").exists()
    finally:
        store.kill()


def test_a_concurrent_pull_into_the_same_directory_is_refused(deployed, url, s3_env, tmp_path):
    src, dst, _ = deployed
    import fcntl

    with open(tmp_path / ".dst.sync" / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(StorageError, match="another pull into .* is running"):
            make_repository(src, tag="v2")
            _push(src, url, s3_env)
            _pull(url, dst, s3_env)


# ---------------------------------------------------------------------------------- refresh

@pytest.mark.slow
def test_refresh_reloads_only_changed_models_without_failing_others(deployed, url, s3_env, cache_dir, tmp_path):
    src, dst, _ = deployed
    with triton(dst, cache_dir, tmp_path / "triton.log") as server:
        before = answers(server.http_url)
        failures, calls, stop = [], [0], threading.Event()

        def hammer() -> None:  # requests to a model that does not change must never fail
            while not stop.is_set():
                try:
                    assert infer(server.http_url, "reverse", ["abc"]) == ["cba"]
                    calls[0] += 1
                except Exception as e:  # noqa: BLE001
                    failures.append(repr(e))

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            make_repository(src, tag="v2", seed=2)
            _push(src, url, s3_env)
            report = storage.refresh(url, dst, f"http://{server.http_url}", endpoint_url=s3_env.endpoint, quiet=True)
        finally:
            stop.set()
            thread.join()
        assert report.loaded == ["upper"] and report.unloaded == [] and not report.failed
        after = answers(server.http_url)
        assert after["upper"][0].startswith("HELLO|v2|") and after["upper"] != before["upper"]
        assert after["pipeline"] == after["upper"] and after["reverse"] == before["reverse"]
        assert failures == [] and calls[0] > 0

        for p in sorted((src / "reverse").rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (src / "reverse").rmdir()
        _push(src, url, s3_env, delete=True)
        report = storage.refresh(url, dst, server.http_url, endpoint_url=s3_env.endpoint, quiet=True)
        assert report.unloaded == ["reverse"] and report.loaded == []
        assert server.model_states().get("reverse", {}).get("state") != "READY"
        with pytest.raises(urllib.error.HTTPError):
            infer(server.http_url, "reverse", ["ab"])
        assert infer(server.http_url, "upper", ["x"])[0].startswith("X|v2|")


def test_refresh_needs_a_running_server(deployed, url, s3_env):
    src, dst, v1 = deployed
    with pytest.raises(Exception, match="cannot reach Triton"):
        storage.refresh(url, dst, f"http://127.0.0.1:{free_port()}", endpoint_url=s3_env.endpoint, quiet=True)
    assert digests(dst) == v1  # nothing pulled when there is no server to refresh


# -------------------------------------------------------------------------------------- CLI

def test_cli_push_and_pull(tmp_path, url, s3_env):
    src = make_repository(tmp_path / "src")
    runner = CliRunner()
    result = runner.invoke(main, ["repo", "push", str(src), url, "--endpoint-url", s3_env.endpoint])
    assert result.exit_code == 0, result.output
    n = len(storage.scan_local(src).files)
    assert f"pushed {n} files" in result.output and "to " + url in result.output
    result = runner.invoke(main, ["repo", "pull", url, str(tmp_path / "dst"), "--endpoint-url", s3_env.endpoint, "-q"])
    assert result.exit_code == 0 and result.output == ""
    assert digests(tmp_path / "dst") == digests(src)


def test_cli_takes_the_endpoint_from_the_environment(tmp_path, url, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    result = CliRunner().invoke(main, ["repo", "push", str(make_repository(tmp_path / "src")), url, "-q"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("args, message", [
    (["pull", "models/prod", "DST"], "'models/prod' is not an object-storage URL: write s3://BUCKET/PREFIX"),
    (["pull", "s3://no-such-bucket/p", "DST"], "bucket 'no-such-bucket' does not exist"),
    (["push", "SRC", "s3://no-such-bucket/p"], "bucket 'no-such-bucket' does not exist"),
    (["refresh", "s3://x-bucket/p", "DST", "--server", "127.0.0.1:1"], "cannot reach Triton at http://127.0.0.1:1"),
])
def test_cli_errors_are_one_line(tmp_path, s3_env, args, message):
    make_repository(tmp_path / "src")
    args = [a.replace("DST", str(tmp_path / "dst")).replace("SRC", str(tmp_path / "src")) for a in args]
    result = CliRunner().invoke(main, ["repo", *args, "--endpoint-url", s3_env.endpoint, "-q"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.slow
def test_serve_from_object_storage_and_refresh_on_sighup(tmp_path, url, s3_env, cache_dir):
    src = make_repository(tmp_path / "src")
    _push(src, url, s3_env)
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, **s3_env.env(), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "builder", "serve", "--repository", url,
           "--endpoint-url", s3_env.endpoint, "--no-proxy", "--http-port", str(http), "--grpc-port", str(grpc),
           "--metrics-port", str(metrics), "--log-file", str(tmp_path / "triton.log")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        address = f"127.0.0.1:{http}"
        _wait_for(lambda: infer(address, "upper", ["a"]), proc, 120)
        assert infer(address, "upper", ["a"])[0].startswith("A|v1|")
        make_repository(src, tag="v2", seed=2)
        _push(src, url, s3_env)
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: infer(address, "upper", ["a"])[0].startswith("A|v2|") or None, proc, 60)
        assert infer(address, "reverse", ["ab"]) == ["ba"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "pulled s3://" in out and "refresh: " in out and "reloaded: upper" in out


def _wait_for(probe, proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {proc.stdout.read() if proc.stdout else ''}")
        try:
            result = probe()
            if result:
                return result
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.3)
    raise AssertionError("timed out waiting for the server")
