"""Engine call (not decoupled): the ensemble's way into the decoupled engine. Forwards each request
in-process (BLS) with streaming off and answers with its one result, so plain `infer` and streaming
share one engine instance and its weights.

One instance serves every request, each in its own thread, answering through its response sender
(allowed for non-decoupled models too): `execute` returns at once. A blocking `execute` would need
one stub process per request in flight, and Triton's health check of a stub that blocks for the
length of a generation fails when the stub's health thread is starved for a second (seen in CI
under load: "Stub process ... is not healthy").
"""

import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from backends import triton_io as io
from backends.metrics import ModelMetrics
from backends.postprocess import finish_reason
from backends.stub_watch import StubWatch

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
OUTPUTS = ["output_ids", "sequence_length"]


class TritonPythonModel:
    def initialize(self, args):
        self.engine = io.parameters(args)["engine_model"]
        self.engine_stubs = StubWatch(self.engine)     # a call inside a dead engine ends (triton_io)
        self.metrics = ModelMetrics(args["model_name"])

    def _count(self, r, answer) -> None:
        """Usage as the ensemble's postprocessing reports it: prompt = input_lengths, completion =
        sequence_length (finish_reason without stop strings, which only the text shows)."""
        length = int(pb_utils.get_output_tensor_by_name(answer, "sequence_length").as_numpy().reshape(-1)[0])
        ids = pb_utils.get_output_tensor_by_name(answer, "output_ids").as_numpy().reshape(-1)[:length].tolist()
        end_id, max_tokens = io.scalar(r, "end_id", int), io.scalar(r, "request_output_len", int) or 0
        self.metrics.answered(io.scalar(r, "input_lengths", int) or 0, length,
                              finish_reason(ids, length, end_id if end_id is not None else -1, max_tokens, False))

    def _one(self, r):
        inputs = [t for t in r.inputs() if t.name() != "streaming"]
        inputs.append(pb_utils.Tensor("streaming", np.array([[False]], dtype=np.bool_)))
        alive = self.engine_stubs.guard()
        call = pb_utils.InferenceRequest(model_name=self.engine, inputs=inputs, requested_output_names=OUTPUTS,
                                         parameters=io.call_parameters(alive))
        answer = None
        for response in io.exec_decoupled(call, alive, self.engine):   # held past the stub's cleanup (triton_io)
            if response.has_error():
                return io.error_response(response.error().message())
            if response.output_tensors():
                answer = response
        if answer is None:
            return io.error_response(f"{self.engine} returned no answer; retry the request")
        if self.metrics.on:
            self._count(r, answer)
        return pb_utils.InferenceResponse([pb_utils.get_output_tensor_by_name(answer, n) for n in OUTPUTS])

    def _run(self, r) -> None:
        sender = r.get_response_sender()
        response = io.guarded("engine call", self._one, r)
        try:
            sender.send(response, flags=FINAL)
        except Exception as e:  # the client (or the ensemble) is gone
            pb_utils.Logger.log_warn(f"engine call: answer not delivered: {e!r}")

    def execute(self, requests):
        for r in requests:
            threading.Thread(target=self._run, args=(r,), daemon=True).start()
        return None

    def finalize(self):
        io.release_held()
