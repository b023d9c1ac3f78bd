"""Claims about builds that a reviewer would want proved: a rebuild that fails leaves the existing
repository byte for byte as it was, and a safetensors checkpoint with a pickle beside it builds
(LLM and embedding) without the pickle ever being opened: an audit hook on `open` in the build
process watches for it, and the pickle itself would leave a mark if anything unpickled it."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

from backends.contract import precisions
from builder.build.sources.checkpoint import default_embedding_dir
from builder.cli.build import build_engines

pytestmark = pytest.mark.slow


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path below root with its bytes, mode and inode: what "untouched" means."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = p.relative_to(root).as_posix()
        out[rel] = (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink()
                    else "dir", st.st_mode, st.st_ino, st.st_mtime_ns)
    return out


def test_a_failed_rebuild_leaves_the_repository_untouched(tmp_path, tiny_repository, tiny_llama, build_cache,
                                                           monkeypatch):
    out = tmp_path / "repo"
    shutil.copytree(tiny_repository, out, symlinks=True)
    before = snapshot(out)
    strict = dataclasses.replace(precisions.PRECISIONS["fp32"], llm_min_top1=1.5)   # no engine can pass
    monkeypatch.setitem(precisions.PRECISIONS, "fp32", strict)
    result = CliRunner().invoke(build_engines, [str(tiny_llama), "--name", "tiny-llama", "--precision", "fp32",
                                                "--context-size", "256", "--max-batch-size", "2", "--force",
                                                "-o", str(out), "--cache-dir", str(build_cache)])
    assert result.exit_code == 1 and "accuracy floor" in result.output, result.output
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".repo.*")), "a staging directory was left behind"


class _Trap:
    """Unpickling this creates `mark`: proof that something loaded the pickle."""

    def __init__(self, mark: Path):
        self.mark = str(mark)

    def __reduce__(self):
        return open, (self.mark, "w")


AUDITED_BUILD = r'''
import os, sys
watched = set(sys.argv[1].split(os.pathsep))
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path in watched:
            sys.stderr.write(f"\nAUDIT: opened {path}\n")
sys.addaudithook(hook)
from builder.cli.build import build_engines
build_engines(sys.argv[2:])
'''


def with_pickles_beside(src: Path, dst: Path, mark: Path) -> list[Path]:
    """A copy of the safetensors checkpoint `src` plus the pickle files a hub repository often carries."""
    shutil.copytree(src, dst)
    payload = pickle.dumps(_Trap(mark))
    pickles = [dst / "pytorch_model.bin", dst / "model.pt", dst / "training_args.bin"]
    for p in pickles:
        p.write_bytes(payload)
    return pickles


@pytest.mark.parametrize("kind", ["llm", "embedding"])
def test_safetensors_beside_a_pickle_builds_without_opening_it(tmp_path, kind, tiny_llama):
    src = with_pickles_beside(tiny_llama if kind == "llm" else default_embedding_dir(), tmp_path / "ckpt",
                              tmp_path / "UNPICKLED")
    out = tmp_path / "repo"
    args = [str(tmp_path / "ckpt"), "--name", f"guarded-{kind}", "--kind", kind, "--precision", "fp32",
            "-o", str(out), "--cache-dir", str(tmp_path / "cache")]   # a fresh cache: the checkpoint is really read
    args += ["--context-size", "256"] if kind == "llm" else []
    watched = os.pathsep.join(os.path.realpath(p) for p in src)
    result = subprocess.run([sys.executable, "-c", AUDITED_BUILD, watched, *args], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1800, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AUDIT: opened" not in result.stderr and not (tmp_path / "UNPICKLED").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"guarded-{kind}:fp32" in json.dumps(manifest)
    assert all(p.read_bytes() == pickle.dumps(_Trap(tmp_path / "UNPICKLED")) for p in src)


def test_the_audit_hook_does_see_an_open(tmp_path):
    """The watcher itself works: a build that did open a watched file would be caught."""
    watched = tmp_path / "pytorch_model.bin"
    watched.write_bytes(b"x")
    probe = AUDITED_BUILD.replace("from builder.cli.build import build_engines\nbuild_engines(sys.argv[2:])",
                                  "open(sys.argv[2], 'rb').close()")
    result = subprocess.run([sys.executable, "-c", probe, str(watched), str(watched)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0 and f"AUDIT: opened {watched}" in result.stderr
