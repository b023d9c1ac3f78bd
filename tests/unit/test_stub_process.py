"""backends.stub_process: what every built model.py applies before its model's code (only in Triton
stubs). openvino and openvino_genai still import and run there, without the model-conversion API."""

from tests.support.python_json import python_json

IN_A_STUB = """
import json, sys
import backends.stub_process
import numpy as np
import openvino as ov
import openvino_genai
from openvino import opset13 as op
x = op.parameter([2], np.float32, name="x")
compiled = ov.Core().compile_model(ov.Model([op.multiply(x, x)], [x]), "CPU")
out = compiled.create_infer_request().infer({"x": np.array([2.0, 3.0], np.float32)})[0].tolist()
print(json.dumps({"out": out, "convert_model": hasattr(ov, "convert_model"),
                  "ovc_loaded": any(m.startswith("openvino.tools.ovc.") for m in sys.modules),
                  "genai": hasattr(openvino_genai, "ContinuousBatchingPipeline")}))
"""


def test_a_stub_runs_openvino_and_genai_without_loading_the_conversion_api():
    got = python_json("-c", IN_A_STUB)
    assert got == {"out": [4.0, 9.0], "convert_model": False, "ovc_loaded": False, "genai": True}


def test_other_processes_keep_the_conversion_api():
    got = python_json("-c", "import json, openvino as ov\n"
                            "print(json.dumps({'convert_model': hasattr(ov, 'convert_model')}))")
    assert got == {"convert_model": True}


ENGINE_STUB_IMPORTS = """
import json, sys
sys.path.insert(0, sys.argv[1])     # triton_python_backend_utils, as in a stub
import backends.stub_process
from backends.models.llm_engine import TritonPythonModel
print(json.dumps({"model": TritonPythonModel.__name__,
                  "loaded": sorted(m for m in ("jinja2", "tokenizers") if m in sys.modules)}))
"""


def test_the_engine_stub_imports_no_tokenizer_nor_templates():
    """The engine only reads token ids; preprocessing's imports would lengthen every LLM cold start."""
    from builder.serve.triton_server import _pytriton_dir

    got = python_json("-c", ENGINE_STUB_IMPORTS, str(_pytriton_dir() / "backends" / "python"))
    assert got == {"model": "TritonPythonModel", "loaded": []}
