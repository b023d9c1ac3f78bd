"""Streaming model (decoupled): preprocessing -> engine (streamed) -> text chunks.

Each request gets its own thread and its own TextStream, so detokenization keeps its state across
chunks (spaces and multi-byte characters survive chunk boundaries). A client that goes away, or a
stop string, ends the engine request through the engine's `stop` input.
"""

import threading
import uuid
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from backends import triton_io as io
from backends.contract import tensors as contract
from backends.errors import RequestError
from backends.metrics import ModelMetrics
from backends.postprocess import TextStream
from backends.preprocess import utf8
from backends.stub_watch import StubWatch
from backends.tokenization import ModelTokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PRE_OUTPUTS = [t.name for t in contract.PREPROCESSING_OUTPUTS]


def _response(chunk, prompt_tokens, notice, outputs):
    return pb_utils.InferenceResponse(io.tensors({
        "text_output": np.array([chunk.text.encode()], dtype=object),
        "prompt_tokens": np.array([prompt_tokens], dtype=np.int32),
        "completion_tokens": np.array([chunk.completion_tokens], dtype=np.int32),
        "finish_reason": np.array([chunk.finish_reason.encode()], dtype=object),
        "notice": np.array([notice], dtype=object),
    }, only=outputs))


class TritonPythonModel:
    def initialize(self, args):
        params = io.parameters(args)
        self.pre, self.engine = params["preprocessing_model"], params["engine_model"]
        self.engine_stubs = StubWatch(self.engine)     # a stream inside a dead engine ends (triton_io)
        self.tok = ModelTokenizer.load(Path(args["model_repository"]) / args["model_version"] / "tokenizer")
        self.metrics = ModelMetrics(args["model_name"])

    def _preprocess(self, r) -> dict:
        inputs = [t for t in r.inputs() if t.name() != "stream"]
        inputs.append(pb_utils.Tensor("stream", np.array([[True]], dtype=np.bool_)))
        response = pb_utils.InferenceRequest(model_name=self.pre, inputs=inputs,
                                             requested_output_names=PRE_OUTPUTS).exec()
        if response.has_error():
            raise RequestError(response.error().message())
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in PRE_OUTPUTS}

    def _stop_engine(self, key: str) -> None:
        stop = pb_utils.InferenceRequest(
            model_name=self.engine, request_id=key, requested_output_names=[],
            inputs=[pb_utils.Tensor("input_ids", np.zeros((1, 1), np.int32)),
                    pb_utils.Tensor("input_lengths", np.ones((1, 1), np.int32)),
                    pb_utils.Tensor("request_output_len", np.ones((1, 1), np.int32)),
                    pb_utils.Tensor("stop", np.array([[True]], dtype=np.bool_))])
        for _ in io.exec_decoupled(stop, self.engine_stubs.guard(), self.engine):
            pass

    def _serve(self, r, sender) -> None:
        pre = self._preprocess(r)
        stops = [utf8(w, "stop_words") for w in io.strings(r, "stop_words") if w]
        stream = TextStream(self.tok, int(pre["OUT_END_ID"].reshape(-1)[0]),
                            int(pre["REQUEST_OUTPUT_LEN"].reshape(-1)[0]), stops)
        prompt_tokens = int(pre["PROMPT_TOKENS"].reshape(-1)[0])
        notice = pre["NOTICE"].reshape(-1)[0]
        outputs = io.requested_outputs(r)
        key = f"stream-{uuid.uuid4().hex}"
        alive = self.engine_stubs.guard()
        call = pb_utils.InferenceRequest(
            model_name=self.engine, request_id=key, requested_output_names=["output_ids", "sequence_length"],
            parameters=io.call_parameters(alive), inputs=[pb_utils.Tensor(engine, pre[name]) for name, engine in contract.PREPROCESSING_TO_ENGINE.items()])
        ended = ""      # why the engine request was stopped early: the rest of its responses is drained
        for response in io.exec_decoupled(call, alive, self.engine):
            if response.has_error():
                raise RequestError(response.error().message())
            if not ended and io.is_cancelled(r):
                pb_utils.Logger.log_info(f"stream: {key} cancelled by the client; stopping its engine request")
                self._stop_engine(key)
                ended = "cancelled"
            tensors = response.output_tensors()
            if ended or not tensors:
                continue  # draining after a stop, or the engine's final flag alone
            length = int(pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy().reshape(-1)[0])
            ids = pb_utils.get_output_tensor_by_name(response, "output_ids").as_numpy().reshape(-1)[:length].tolist()
            chunk = stream.add(ids)
            if chunk.text:
                sender.send(_response(chunk, prompt_tokens, notice, outputs))
            if stream.stopped:
                self._stop_engine(key)
                ended = "stop string"
        if ended == "cancelled":
            self.metrics.failed("cancelled")
            # Triton counts the request in flight until its final flag (an unload waits for it): send
            # it even though nobody listens any more.
            try:
                sender.send(flags=FINAL)
            except Exception:
                pass
            return
        last = stream.end()
        sender.send(_response(last, prompt_tokens, notice, outputs), flags=FINAL)
        self.metrics.answered(prompt_tokens, last.completion_tokens, last.finish_reason)

    def _run(self, r) -> None:
        sender = r.get_response_sender()
        try:
            self._serve(r, sender)
        except RequestError as e:
            sender.send(io.error_response(str(e)), flags=FINAL)
        except io.CalleeGone as e:
            self.metrics.failed("engine error")
            pb_utils.Logger.log_warn(f"stream: {e}")
            try:
                sender.send(io.error_response(str(e), unavailable=True), flags=FINAL)
            except Exception:
                pass  # the client is gone
        except Exception as e:
            self.metrics.failed("engine error")
            pb_utils.Logger.log_error(f"stream: {e!r}")
            try:
                sender.send(io.error_response(f"internal error in stream: {type(e).__name__}: {e}", internal=True),
                            flags=FINAL)
            except Exception:
                pass  # the client is gone

    def execute(self, requests):
        for r in requests:
            threading.Thread(target=self._run, args=(r,), daemon=True).start()
        return None

    def finalize(self):
        io.release_held()
