"""`export kubernetes` against a real S3 store (moto on loopback) and the image's entry point run
without Docker: the per-deployment repository holds exactly that deployment, and the command and
environment docker/Dockerfile.cpu sets serve it, from s3:// (standard mode) and from the files
KServe's storage initializer would download (knative mode), with API keys provisioned as the
Secret mount provides them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import TINY_NAME

from backends.contract.manifest import MANIFEST_NAME, read_manifest
from builder.serve import kubernetes as k8s
from builder.serve import storage
from builder.serve.gateway.keys import KeyStore
from builder.serve.ports import free_ports
from tests.support.dockerfile import Dockerfile
from tests.support.serve import stop_serve

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MODEL = f"{TINY_NAME}:fp32"
TRITON_MODEL = f"{TINY_NAME}-fp32"


@pytest.fixture
def exported(tiny_repository, s3_env, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = f"s3://{s3_bucket}/models/prod"
    storage.push(tiny_repository, url, endpoint_url=s3_env.endpoint, quiet=True)
    deployment_file = tmp_path / "deployment.toml"
    deployment_file.write_text(f'[serving]\nallowed_ips = ["203.0.113.0/24"]\n\n[[models]]\nname = "{TINY_NAME}"\n'
                               f'precisions = ["fp32"]\n\n[kubernetes]\nmax_replicas = 2\n')
    report = k8s.export_kubernetes(url, tmp_path / "k8s", deployment_file=deployment_file, mode="knative",
                                   endpoint_url=s3_env.endpoint, quiet=True, echo=lambda _: None)
    return url, report


def _index(s3_env, uri: str) -> dict:
    loc = storage.parse_url(uri.rstrip("/"))
    body = s3_env.client().get_object(Bucket=loc.bucket, Key=loc.index_key)["Body"].read()
    return json.loads(body)


def test_each_storage_uri_holds_exactly_its_deployments_repository(exported, s3_env, tiny_repository):
    url, report = exported
    [deployment] = report.deployments
    assert deployment.user_name == MODEL and deployment.storage_uri == f"{k8s.deployments_url(url)}/{TRITON_MODEL}/"
    entry = read_manifest(tiny_repository).deployments[MODEL]
    index = _index(s3_env, deployment.storage_uri)
    paths = {f["path"] for f in index["files"]}
    roots = tuple(f"{m}/" for m in entry.triton_models) + (entry.runtime.path + "/",)
    assert MANIFEST_NAME in paths and all(p == MANIFEST_NAME or p.startswith(roots) for p in paths)
    assert set(entry.files) <= paths                                  # every file the manifest lists
    assert index["dirs"] == []                                        # no empty folder: each got a .keep
    # the InferenceService points at that prefix, and the manifests build
    built = subprocess.run(["kubectl", "kustomize", str(report.out)], capture_output=True, text=True, timeout=60, check=False)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    [isvc] = [d for d in docs if d["kind"] == "InferenceService"]
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == deployment.storage_uri
    assert isvc["spec"]["predictor"]["maxReplicas"] == 2
    ranges = yaml.safe_load((report.out / "public-ingress-patch.yaml").read_text())["spec"]["loadBalancerSourceRanges"]
    assert ranges == ["203.0.113.0/24"]
    assert s3_env.secret_key not in built.stdout and s3_env.access_key not in built.stdout.replace("testing-", "")


def _kserve_download(s3_env, uri: str, target: Path) -> Path:
    """What KServe's storage initializer does (kserve_storage.py `_download_s3`): every object under
    the prefix, skipping directory markers and empty objects, no empty folders."""
    loc = storage.parse_url(uri.rstrip("/"))
    client = s3_env.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix + "/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/") or obj["Size"] == 0:
                continue
            dest = target / obj["Key"].removeprefix(loc.prefix + "/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(loc.bucket, obj["Key"], str(dest))
    return target


class ImageEntryPoint:
    """The image's ENTRYPOINT + CMD with its ENV, run here: only ports and writable paths changed."""

    def __init__(self, tmp: Path, **env: str):
        df = Dockerfile.read(ROOT / "docker" / "Dockerfile.cpu")
        self.http, grpc, metrics = free_ports(3)
        self.state = tmp / "state"
        image_env = dict(df.env)
        image_env.update({
            "SERVERLESS_TRITON_SERVE_HTTP_PORT": str(self.http), "SERVERLESS_TRITON_SERVE_GRPC_PORT": str(grpc),
            "SERVERLESS_TRITON_SERVE_METRICS_PORT": str(metrics), "SERVERLESS_TRITON_SERVE_PUBLIC_ADDRESSES": "127.0.0.1",
            "SERVERLESS_TRITON_SERVE_STATE_DIR": str(self.state), "XDG_CACHE_HOME": str(tmp / "cache"),
            "SERVERLESS_TRITON_SERVE_LOG_FILE": str(tmp / "triton.log"), **env})
        command = df.command()
        command[0] = str(Path(sys.executable).parent / command[0])   # the console script pip installs
        self.output = tmp / "serve.out"
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(command, env={**os.environ, **image_env}, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def wait_healthy(self, timeout: float = 240) -> None:
        """The image's HEALTHCHECK, as Docker would run it."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.output.read_text()
            try:
                if httpx.get(f"{self.url}{k8s.HEALTH_READY}", timeout=4).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.output.read_text()
            time.sleep(0.5)

    def stop(self) -> None:
        stop_serve(self.process)


def _provision_keys(state: Path) -> str:
    """What the api-keys Secret mount provides: an api-keys.json of hashes at <state>/api-keys.json,
    written by `serverless-triton api-keys create --state-dir` elsewhere and copied in."""
    elsewhere = state.parent / "keys"
    key = KeyStore(elsewhere).create("k8s-client")
    state.mkdir(parents=True)
    shutil.copy(elsewhere / "api-keys.json", state / "api-keys.json")
    assert key not in (state / "api-keys.json").read_text()
    return key


def _check_serves(serve: ImageEntryPoint, key: str) -> None:
    serve.wait_healthy()
    body = {"text_input": "Hello", "max_tokens": 4}
    refused = httpx.post(f"{serve.url}/v2/models/{TRITON_MODEL}/generate", json=body, timeout=60)
    assert refused.status_code == 401
    answer = httpx.post(f"{serve.url}/v2/models/{TRITON_MODEL}/generate", json=body, timeout=300,
                        headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200 and answer.json()["completion_tokens"] >= 1


def test_the_image_entry_point_serves_a_deployment_pulled_from_s3(exported, s3_env, tmp_path):
    """Standard mode: the Deployment sets the repository to the deployment's s3:// prefix."""
    _, report = exported
    pod = tmp_path / "pod"
    key = _provision_keys(pod / "state")
    serve = ImageEntryPoint(pod, SERVERLESS_TRITON_SERVE_REPOSITORY=report.deployments[0].storage_uri,
                            AWS_ENDPOINT_URL=s3_env.endpoint, **s3_env.env())
    try:
        _check_serves(serve, key)
    finally:
        serve.stop()
    assert serve.process.returncode == 0 and "stopped" in serve.output.read_text()


def test_the_image_entry_point_serves_what_kserve_downloads_with_keys_from_the_secret(exported, s3_env, tmp_path):
    """Knative mode: KServe's storage initializer fills /mnt/models (read-only); keys come from the
    Secret mounted at <state>/api-keys.json."""
    _, report = exported
    models = _kserve_download(s3_env, report.deployments[0].storage_uri, tmp_path / "mnt-models")
    for path in sorted(models.rglob("*"), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)
    models.chmod(0o555)
    pod = tmp_path / "pod"
    key = _provision_keys(pod / "state")
    serve = ImageEntryPoint(pod, SERVERLESS_TRITON_SERVE_REPOSITORY=str(models))   # the image's /mnt/models
    try:
        _check_serves(serve, key)
    finally:
        serve.stop()
        for path in [models, *models.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert serve.process.returncode == 0
