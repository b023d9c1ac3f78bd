"""Engine call (not decoupled): the ensemble's way into the decoupled engine. Forwards one request
in-process (BLS) with streaming off and returns its one answer, so plain `infer` and streaming
share one engine instance and its weights."""

import numpy as np
import triton_python_backend_utils as pb_utils

from backends import triton_io as io

OUTPUTS = ["output_ids", "sequence_length"]


class TritonPythonModel:
    def initialize(self, args):
        self.engine = io.parameters(args)["engine_model"]

    def _one(self, r):
        inputs = [t for t in r.inputs() if t.name() != "streaming"]
        inputs.append(pb_utils.Tensor("streaming", np.array([[False]], dtype=np.bool_)))
        call = pb_utils.InferenceRequest(model_name=self.engine, inputs=inputs, requested_output_names=OUTPUTS)
        answer = None
        for response in call.exec(decoupled=True):
            if response.has_error():
                return io.error_response(response.error().message())
            if response.output_tensors():
                answer = response
        if answer is None:
            return io.error_response(f"{self.engine} returned no answer; retry the request")
        return pb_utils.InferenceResponse([pb_utils.get_output_tensor_by_name(answer, n) for n in OUTPUTS])

    def execute(self, requests):
        return [io.guarded("engine call", self._one, r) for r in requests]
