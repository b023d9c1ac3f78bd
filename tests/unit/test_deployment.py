"""Deployment files and names: the one mapping of user names to Triton names, and clear errors."""

from __future__ import annotations

import pytest

from backends.contract.naming import DeploymentName
from backends.errors import InvalidArgumentError, SourceError
from builder.build.deployment import DeploymentSpec, load_deployment_file


def test_user_names_map_to_url_safe_triton_names():
    dep = DeploymentName.parse("smollm2-135m-instruct:int8")
    assert (dep.name, dep.precision, str(dep)) == ("smollm2-135m-instruct", "int8", "smollm2-135m-instruct:int8")
    assert dep.llm == "smollm2-135m-instruct-int8" and dep.llm_stream == "smollm2-135m-instruct-int8-stream"
    assert dep.preprocessing == "smollm2-135m-instruct-preprocessing"  # shared by precisions
    assert all(":" not in m and "/" not in m for m in dep.llm_models() + dep.embedding_models())
    assert len(set(dep.llm_models())) == len(dep.llm_models())


@pytest.mark.parametrize("bad,match", [("smollm2", "no precision"), ("smollm2:fp4", "unknown precision"),
                                       ("Big Model:int8", "invalid deployment name"), (":int8", "invalid")])
def test_bad_user_names(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        DeploymentName.parse(bad)


def test_deployment_file(tmp_path):
    f = tmp_path / "deployment.toml"
    f.write_text('''
[serving]
allowed_ips = ["203.0.113.0/24"]

[[models]]
name = "chat"
source = "models/llama"
precisions = ["int8", "fp16"]
context_size = 4096

[[models]]
name = "search"
kind = "embedding"
precisions = ["int8"]
''')
    specs, serving = load_deployment_file(f)
    assert [s.name for s in specs] == ["chat", "search"]
    assert specs[0].source == str(tmp_path / "models" / "llama") and specs[0].precisions == ["int8", "fp16"]
    assert specs[1].kind == "embedding" and specs[1].source == "default"
    assert serving.allowed_ips == ["203.0.113.0/24"]


@pytest.mark.parametrize("text,match", [
    ("[[models]]\nname = 'a'\ncolour = 'red'\n", "unknown keys"),
    ("[serving]\nallowed_ips = []\n", "no \\[\\[models\\]\\]"),
    ("[[models]]\nname = 'a'\n[[models]]\nname = 'a'\n", "appears twice"),
    ("[[models]]\nname = 'a'\nkind = 'vision'\n", "unknown kind"),
    ("[[models]]\nname = 'a'\nprecisions = ['int3']\n", "unknown precision"),
    ("[[models]\nname = 'a'\n", "not valid TOML"),
    ("[[models]]\nname = 'a'\nmax_batch_size = 0\n", "max batch size"),
    ("[[models]]\nname = 'a'\nprompt_lookup = 'yes'\n", "prompt_lookup must be true or false"),
    ("[[models]]\nname = 'a'\nmemory_test = 'no'\n", "memory_test must be true or false"),
    ("[[models]]\nname = 'a'\nkind = 'embedding'\nprecisions = ['int8']\nprompt_lookup = true\n",
     "prompt_lookup is for LLM deployments"),
    ("[[models]]\nname = 'a'\nengine = 'tensorrt-llm'\nprompt_lookup = true\n", "CPU engine only"),
])
def test_deployment_file_errors(tmp_path, text, match):
    f = tmp_path / "d.toml"
    f.write_text(text)
    with pytest.raises(InvalidArgumentError, match=match):
        load_deployment_file(f)


def test_missing_deployment_file(tmp_path):
    with pytest.raises(SourceError, match="cannot read"):
        load_deployment_file(tmp_path / "none.toml")


def test_spec_checks():
    with pytest.raises(InvalidArgumentError, match="too small"):
        DeploymentSpec("a", context_size=4)
    with pytest.raises(InvalidArgumentError, match="pooling"):
        DeploymentSpec("a", kind="embedding", pooling="max")


def test_prompt_lookup_reaches_the_engine_config(tmp_path):
    from backends.contract import tensors as contract
    from builder.build import repository

    f = tmp_path / "d.toml"
    f.write_text("[[models]]\nname = 'chat'\nprecisions = ['int8']\nprompt_lookup = true\n")
    (spec,), _ = load_deployment_file(f)
    assert spec.prompt_lookup is True and DeploymentSpec("plain").prompt_lookup is False
    for on in (True, False):
        text = repository.render_config("llm_engine", name="chat-int8-engine", deployment="chat:int8",
                                        inputs=contract.ENGINE_INPUTS, outputs=contract.ENGINE_OUTPUTS,
                                        context_size=2048, max_batch_size=8, precision="int8", prompt_lookup=on)
        assert f'key: "prompt_lookup" value: {{ string_value: "{str(on).lower()}" }}' in text, text


def test_prompt_lookup_is_refused_once_auto_resolves_to_tensorrt_llm():
    spec = DeploymentSpec("llm", prompt_lookup=True)       # engine auto: accepted until it is resolved
    spec.check_engine_features("cpu")
    with pytest.raises(InvalidArgumentError, match="CPU engine only, and this deployment builds tensorrt-llm"):
        spec.check_engine_features("tensorrt-llm")


def test_no_memory_test_reaches_every_spec_and_rebuilds(tmp_path):
    """--no-memory-test is a build choice: it applies to a deployment file's every model, and the
    inputs digest follows it (a later build with the test measures what was estimated)."""
    from builder.build.pipeline import _inputs_digest
    from builder.cli.build import _specs_from_options

    f = tmp_path / "d.toml"
    f.write_text("[[models]]\nname = 'a'\n[[models]]\nname = 'b'\nkind = 'embedding'\nprecisions = ['int8']\n")
    assert [s.memory_test for s in _specs_from_options(str(f), None, "llm", "int8", None, None, "auto", None)[0]] \
        == [True, True]
    specs, _ = _specs_from_options(str(f), None, "llm", "int8", None, None, "auto", None, memory_test=False)
    assert [s.memory_test for s in specs] == [False, False]
    plain, = _specs_from_options(None, None, "llm", "int8", None, None, "auto", None, memory_test=False)[0]
    assert plain.memory_test is False and DeploymentSpec("x").memory_test is True

    class Ckpt:
        digest = "d"
    on, off = DeploymentSpec("x", precisions=["int8"]), DeploymentSpec("x", precisions=["int8"], memory_test=False)
    assert _inputs_digest(on, "int8", Ckpt, "cpu", 256, "c") != _inputs_digest(off, "int8", Ckpt, "cpu", 256, "c")
