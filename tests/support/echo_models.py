"""A tiny Python-backend model for tests and benchmarks of the serving edge (proxy, storage):
upper-cases a BYTES tensor. A text starting with "slow:" takes 1 s (a request in flight during a
reload); one starting with "wait" takes 2 ms without using the CPU (a model bound by its device)."""

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [{ name: "text" data_type: TYPE_STRING dims: [ -1 ] }]
output [{ name: "text" data_type: TYPE_STRING dims: [ -1 ] }]
instance_group [{ kind: KIND_CPU count: 1 }]
"""

ECHO_MODEL = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            first = bytes(texts.flat[0]) if texts.size else b""
            if first.startswith(b"slow:"):
                time.sleep(1.0)
            elif first.startswith(b"wait"):
                time.sleep(0.002)
            out = np.array([bytes(t).upper() for t in texts.flat], dtype=np.object_).reshape(texts.shape)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("text", out)]))
        return responses
'''


def write_python_model(repo, name: str, config: str, model: str) -> None:
    """`repo/name/config.pbtxt` and `repo/name/1/model.py`."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)
    (repo / name / "1" / "model.py").write_text(model)
