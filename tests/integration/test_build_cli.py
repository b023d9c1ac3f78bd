"""build-engines' edges: every bad argument or input exits non-zero with one line that names the
problem and the fix, and leaves no repository (or staging directory) behind."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from backends.contract import precisions
from builder.cli.build import build_engines


def run(*args: str):
    result = CliRunner().invoke(build_engines, list(args))
    return result


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        f"traceback instead of an error line: {result.exception!r}"
    out = result.stderr.strip()
    assert out.startswith("Error: ") and len(out.splitlines()) == 1, result.output
    for n in needles:
        assert n in out, out
    return out


def fake_checkpoint(root: Path, tokenizer_from: Path, **config) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    shutil.copyfile(tokenizer_from / "tokenizer.json", root / "tokenizer.json")
    (root / "model.safetensors").write_bytes(b"")
    return root


def test_missing_source(tmp_path):
    assert_one_line_error(run(str(tmp_path / "nope"), "--name", "x", "-o", str(tmp_path / "o")), "does not exist")


def test_unknown_precision(tmp_path):
    assert_one_line_error(run("--precision", "fp64", "-o", str(tmp_path / "o")), "unknown precision 'fp64'",
                          "fp16")


def test_source_needs_a_name(tmp_path, tiny_llama):
    assert_one_line_error(run(str(tiny_llama), "-o", str(tmp_path / "o")), "--name")


def test_bad_name(tmp_path, tiny_llama):
    assert_one_line_error(run(str(tiny_llama), "--name", "Bad Name!", "-o", str(tmp_path / "o")),
                          "invalid deployment name")


def test_context_above_position_limit(tmp_path, tiny_llama):
    out = assert_one_line_error(run(str(tiny_llama), "--name", "t", "--context-size", "4096",
                                    "-o", str(tmp_path / "o")), "position limit of 512")
    assert "--context-size 512" in out
    assert not (tmp_path / "o").exists()


def test_unwritable_output(tmp_path, tiny_llama):
    (tmp_path / "a-file").write_text("x")
    assert_one_line_error(run(str(tiny_llama), "--name", "t", "-o", str(tmp_path / "a-file" / "repo")),
                          "cannot write")
    assert_one_line_error(run(str(tiny_llama), "--name", "t", "-o", "/proc/serverless-triton-repo"), "cannot write")


def test_foreign_output_directory_is_not_touched(tmp_path, tiny_llama):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"\xff\xd8")
    assert_one_line_error(run(str(tiny_llama), "--name", "t", "-o", str(other)), "not empty")
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]


def test_unsupported_architecture(tmp_path, smollm2):
    src = fake_checkpoint(tmp_path / "gpt2", smollm2.hf_dir, architectures=["GPT2LMHeadModel"], n_positions=1024)
    assert_one_line_error(run(str(src), "--name", "g", "-o", str(tmp_path / "o")), "GPT2LMHeadModel",
                          "LlamaForCausalLM")


def test_pickle_only_weights_are_refused(tmp_path, smollm2):
    src = fake_checkpoint(tmp_path / "pkl", smollm2.hf_dir, architectures=["LlamaForCausalLM"])
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_one_line_error(run(str(src), "--name", "p", "-o", str(tmp_path / "o")), "pickle", "safetensors")


def test_remote_code_is_refused(tmp_path, smollm2):
    src = fake_checkpoint(tmp_path / "remote", smollm2.hf_dir, architectures=["LlamaForCausalLM"],
                          auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})
    (src / "modeling_evil.py").write_text("import os\nos.system('touch /tmp/pwned')\n")
    assert_one_line_error(run(str(src), "--name", "r", "-o", str(tmp_path / "o")), "custom code")


def test_missing_tokenizer(tmp_path, smollm2):
    src = fake_checkpoint(tmp_path / "notok", smollm2.hf_dir, architectures=["LlamaForCausalLM"])
    (src / "tokenizer.json").unlink()
    assert_one_line_error(run(str(src), "--name", "n", "-o", str(tmp_path / "o")), "tokenizer.json")


def test_engine_below_its_floor_is_not_published(tmp_path, tiny_llama, build_cache, monkeypatch):
    strict = dataclasses.replace(precisions.PRECISIONS["fp32"], llm_min_top1=1.5)
    monkeypatch.setitem(precisions.PRECISIONS, "fp32", strict)
    out = tmp_path / "repo"
    assert_one_line_error(run(str(tiny_llama), "--name", "t", "--precision", "fp32", "--context-size", "256",
                              "-o", str(out), "--cache-dir", str(build_cache)), "accuracy floor", "not published")
    assert not out.exists()
    assert not list(tmp_path.glob(".repo.*")), "a staging directory was left behind"


def test_dry_run_prints_the_plan_and_builds_nothing(tmp_path, build_cache):
    out = tmp_path / "repo"
    result = run("--dry-run", "--precision", "int8,fp8", "-o", str(out), "--cache-dir", str(build_cache))
    assert result.exit_code == 0, result.output
    assert "INT8_ASYM" in result.output and "FP8_E4M3" in result.output and "optimum-cli export openvino" in result.output
    assert not out.exists()


def test_build_and_push_then_pull_gives_the_same_repository(tmp_path, tiny_llama, build_cache, s3_env, s3_bucket):
    from backends.contract.manifest import read_manifest, verify_files
    from builder.serve import storage

    out, url = tmp_path / "repo", f"s3://{s3_bucket}/llm"
    result = run(str(tiny_llama), "--name", "t", "--precision", "fp32", "--context-size", "256", "-o", str(out),
                 "--cache-dir", str(build_cache), "--push", url, "--endpoint-url", s3_env.endpoint)
    assert result.exit_code == 0, result.output
    # not a terminal: plain progress lines, no bar redraws (builder/progress.py)
    assert "  writing the repository (manifest, then swapped into place) done (" in result.output, result.output
    assert f"push {url}: 0% (" in result.stderr and f"push {url}: 100% (" in result.stderr, result.stderr
    assert "\r" not in result.output and "\x1b[" not in result.output
    pulled = tmp_path / "pulled"
    storage.pull(url, pulled, endpoint_url=s3_env.endpoint, quiet=True)
    entry = read_manifest(pulled).deployments["t:fp32"]
    assert entry == read_manifest(out).deployments["t:fp32"] and verify_files(pulled, entry) == []
