"""A repository carries its own runtime: the serving host's installed code never replaces it, two
repositories built by different versions serve side by side from one Triton, and a repository
whose runtime was altered is refused with the model named and the fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_NAME

from backends.contract.manifest import check_runtimes, read_manifest
from backends.contract.naming import DeploymentName
from backends.errors import SourceError
from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.build.runtime import default_source
from builder.serve.ports import free_ports
from builder.serve.triton_server import Ports, TritonServer, repository_models
from tests.support.llm_client import generate

pytestmark = pytest.mark.slow
NEWER = "NEWER RUNTIME: "
NEWER_NAME = "tiny-newer"
PROMPT = {"text_input": "The capital of France is", "max_tokens": 8}


@pytest.fixture(scope="module")
def newer_runtime(tmp_path_factory) -> Path:
    """A copy of the runtime as a later version might have it: its postprocessing marks every answer."""
    root = tmp_path_factory.mktemp("newer-host")
    shutil.copytree(default_source(), root / "backends", ignore=shutil.ignore_patterns("__pycache__"))
    post = root / "backends" / "postprocess.py"
    old = "    text, stopped = detokenize(decoder, ids, stop_words)\n"
    assert old in post.read_text()
    post.write_text(post.read_text().replace(old, old + f"    text = {NEWER!r} + text\n"))
    return root


@pytest.fixture(scope="module")
def newer_repository(tmp_path_factory, build_cache, tiny_llama, newer_runtime) -> Path:
    """The tiny Llama built by the 'newer version' (its runtime copied from newer_runtime)."""
    out = tmp_path_factory.mktemp("newer-repo") / "repository"
    build([DeploymentSpec(NEWER_NAME, source=str(tiny_llama), precisions=["fp32"], context_size=256, max_batch_size=2)],
          BuildOptions(output=out, cache_dir=build_cache, echo=lambda _: None,
                       runtime_source=newer_runtime / "backends"))
    return out


def _text(server: TritonServer, model: str) -> str:
    response = generate(server.http_url, model, PROMPT)
    assert response.status_code == 200, response.text
    return response.json()["text_output"]


def test_built_repositories_keep_their_runtime_on_a_newer_host(tiny_repository, newer_repository, newer_runtime,
                                                               cache_dir, tmp_path, monkeypatch):
    old, new = read_manifest(tiny_repository), read_manifest(newer_repository)
    assert old.deployments[f"{TINY_NAME}:fp32"].runtime.digest != new.deployments[f"{NEWER_NAME}:fp32"].runtime.digest
    # the serving host has the newer code installed, ahead of everything else on the stubs' path
    monkeypatch.setenv("PYTHONPATH", str(newer_runtime))
    server = TritonServer(tiny_repository, Ports(*free_ports(3)), cache_dir=cache_dir, log_path=tmp_path / "triton.log",
                          load_models=repository_models(tiny_repository) + repository_models(newer_repository),
                          extra_args=[f"--model-repository={newer_repository.resolve()}"])
    with server:
        old_text = _text(server, DeploymentName(TINY_NAME, "fp32").llm)
        new_text = _text(server, DeploymentName(NEWER_NAME, "fp32").llm)
    assert old_text and not old_text.startswith(NEWER)          # built by this version: its behaviour
    assert new_text.startswith(NEWER) and new_text[len(NEWER):] == old_text   # same weights, newer runtime


def test_an_altered_runtime_is_refused_naming_the_model(tiny_repository, tmp_path):
    repo = tmp_path / "repository"
    shutil.copytree(tiny_repository, repo)
    entry = read_manifest(repo).deployments[f"{TINY_NAME}:fp32"]
    altered = repo / entry.runtime.path / "backends" / "detokenize.py"
    altered.write_text(altered.read_text() + "\n# a stray edit\n")
    with pytest.raises(SourceError, match=rf"model {TINY_NAME}:fp32: its runtime code .* is missing or altered "
                                          r"\(.*backends/detokenize.py\): pull the repository again, or rebuild"):
        check_runtimes(repo, read_manifest(repo))
    result = subprocess.run([sys.executable, "-m", "builder", "serve", "-r", str(repo), "--no-proxy"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: model {TINY_NAME}:fp32: its runtime code in {repo / entry.runtime.path} is missing or altered "
        f"({entry.runtime.path}/backends/detokenize.py): pull the repository again, or rebuild it with build-engines"]
    shutil.rmtree(repo / entry.runtime.path)                      # missing altogether: refused the same way
    with pytest.raises(SourceError, match="is missing or altered"):
        check_runtimes(repo, read_manifest(repo))


def test_serving_host_path_holds_no_project_code():
    """The stubs import what the repository carries: serve puts site-packages on their path, never
    the project's source tree."""
    from builder.serve.triton_server import server_environment

    project = str(Path(__file__).resolve().parents[2])
    assert project not in server_environment()["PYTHONPATH"].split(":")
