"""The typed manifest (schema 2; schema 1 refused with the fix), the runtime copy a repository
carries, and the rebuild digest covering everything that shapes a repository."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backends.contract.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    DeploymentEntry,
    Manifest,
    RuntimeInfo,
    check_runtimes,
    checksums,
    read_manifest,
    write_manifest,
)
from backends.errors import SourceError
from builder.build import pipeline, runtime


def _entry(repo: Path, info: RuntimeInfo, model: str = "m-int8") -> DeploymentEntry:
    (repo / model / "1").mkdir(parents=True)
    (repo / model / "1" / "model.py").write_text(f"RUNTIME = {info.path!r}\n")
    files = {**checksums(repo, repo / model), **checksums(repo, repo / info.path)}
    return DeploymentEntry("m", "int8", "llm", "default", [model], {"infer": model}, {"target": "cpu"},
                           {"reference": "fp32"}, info, "digest", files)


def test_manifest_round_trips_through_json(tmp_path):
    info = runtime.install_runtime(tmp_path)
    manifest = Manifest("serverless-triton test", {"m:int8": _entry(tmp_path, info)})
    write_manifest(tmp_path, manifest)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 2 and data["deployments"]["m:int8"]["runtime"]["path"] == info.path
    assert read_manifest(tmp_path) == manifest
    assert read_manifest(tmp_path / "nowhere", "gen") == Manifest("gen")   # no repository yet: empty


@pytest.mark.parametrize("content,match", [
    ({"schema_version": 1, "deployments": {}}, r"schema 1\): rebuild the repository"),
    ({"schema_version": 7, "deployments": {}}, "schema version 7, this tool reads 2: rebuild"),
    ({"schema_version": 2, "deployments": {"m:int8": {"name": "m"}}}, r"deployment m:int8 is malformed .*rebuild"),
    ("not json", "not a readable manifest"),
])
def test_old_or_broken_manifests_are_refused_with_the_fix(tmp_path, content, match):
    (tmp_path / MANIFEST_NAME).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SourceError, match=match):
        read_manifest(tmp_path)


def test_runtime_copies_are_content_addressed(tmp_path):
    first = runtime.install_runtime(tmp_path)
    assert first.path.startswith("_runtime/") and first.digest.startswith(first.path.split("/")[1])
    copied = tmp_path / first.path / "backends"
    assert (copied / "models" / "llm_preprocessing.py").read_text() == \
        (runtime.default_source() / "models" / "llm_preprocessing.py").read_text()
    assert not list(copied.rglob("__pycache__"))
    assert runtime.install_runtime(tmp_path) == first            # same code: the same copy, not a second one
    newer = tmp_path / "newer" / "backends"
    shutil.copytree(runtime.default_source(), newer, ignore=shutil.ignore_patterns("__pycache__"))
    (newer / "sampling.py").write_text((newer / "sampling.py").read_text() + "\n# newer\n")
    second = runtime.install_runtime(tmp_path, newer)
    assert second.path != first.path and (tmp_path / second.path).is_dir() and (tmp_path / first.path).is_dir()
    runtime.remove_unused_runtimes(tmp_path, {second.path})
    assert not (tmp_path / first.path).exists() and (tmp_path / second.path).is_dir()


def test_altered_or_missing_runtime_names_the_model(tmp_path):
    info = runtime.install_runtime(tmp_path)
    manifest = Manifest("t", {"m:int8": _entry(tmp_path, info)})
    check_runtimes(tmp_path, manifest)                              # as built: accepted
    (tmp_path / "m-int8" / "1" / "model.py").write_text("RUNTIME = '/usr/lib/elsewhere'\n")
    with pytest.raises(SourceError, match=r"model m:int8: .*\(m-int8/1/model.py\): pull the repository again"):
        check_runtimes(tmp_path, manifest)
    manifest = Manifest("t", {"m:int8": _entry(tmp_path / "b", runtime.install_runtime(tmp_path / "b"))})
    shutil.rmtree(tmp_path / "b" / info.path)
    with pytest.raises(SourceError, match="model m:int8: its runtime code in .* is missing or altered"):
        check_runtimes(tmp_path / "b", manifest)


@pytest.mark.parametrize("edit", ["model_repository/llm/config.pbtxt.j2", "builder/build/repository.py",
                                  "builder/build/engines/openvino_llm.py", "backends/contract/precisions.py",
                                  "backends/postprocess.py"])
def test_rebuild_digest_covers_what_shapes_a_repository(tmp_path, monkeypatch, edit):
    """Templates, every build module (writer, targets) and the runtime (floors included) all count."""
    root = Path(__file__).resolve().parents[2]
    for name in ("model_repository", "builder", "backends"):
        shutil.copytree(root / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pipeline, "TEMPLATES", tmp_path / "model_repository")
    monkeypatch.setattr(pipeline, "BUILD_CODE", tmp_path / "builder" / "build")
    monkeypatch.setattr(runtime, "default_source", lambda: tmp_path / "backends")
    before = pipeline.code_digest()
    assert pipeline.code_digest() == before                        # stable
    target = tmp_path / edit
    target.write_text(target.read_text() + "\n")
    assert pipeline.code_digest() != before
