"""CPU engine (decoupled): tensorrtllm's tensor interface over an openvino-genai
ContinuousBatchingPipeline. `execute` only enqueues; the engine's thread answers."""

import gc
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from backends import triton_io as io
from backends.errors import RequestError
from backends.guided import check_guide, check_penalties
from backends.llm_engine import ContinuousBatchingEngine, GenerationRequest, PromptLookup
from backends.metrics import ModelMetrics
from backends.sampling import check_sampling
from backends.word_lists import list_to_words

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
KV_REFRESH_SECONDS = 0.5    # the KV cache gauge follows the engine at most this often


class TritonPythonModel:
    def initialize(self, args):
        params = io.parameters(args)
        engine_dir = Path(args["model_repository"]) / args["model_version"] / "engine"
        self.metrics = ModelMetrics(args["model_name"])
        self._kv_read = 0.0
        self.engine = ContinuousBatchingEngine(engine_dir, int(params["context_size"]),
                                               int(params["max_batch_size"]),
                                               on_step=self._on_step if self.metrics.on else None,
                                               prompt_lookup=PromptLookup() if params.get("prompt_lookup") == "true"
                                               else None)
        # the runtime setting in use (backends/cpu_runtime.py): one key=value line tests and operators read
        pb_utils.Logger.log_info(f"engine {args['model_name']} runtime: " + " ".join(
            f"{k}={v}" for k, v in self.engine.runtime.as_dict().items() if k != "reason")
            + f" prompt_lookup={self.engine.prompt_lookup is not None} ({self.engine.runtime.reason})")

    def _on_step(self, running: int, waiting: int) -> None:
        """Gauges after each engine step (the KV cache read at most every 0.5 s)."""
        self.metrics.gauge("requests_running", running)
        self.metrics.gauge("requests_waiting", waiting)
        now = time.monotonic()
        if now - self._kv_read >= KV_REFRESH_SECONDS or not running:
            self._kv_read = now
            self.metrics.gauge("kv_cache_usage_ratio", round(self.engine.cache_usage(), 4))

    def _observe(self, request: GenerationRequest, reason: str) -> None:
        """Latency histograms of a finished request, errors by reason (tokens and successes are
        counted where the client's usage is made: the engine call and stream models)."""
        if reason in ("stop", "length", "stopped"):   # stopped: by the stream model (a stop string, a client gone)
            r, now = request, time.monotonic()
            self.metrics.timed(r.admitted_at - r.received_at if r.admitted_at else None,
                               r.first_token_at - r.received_at if r.first_token_at else None,
                               now - r.received_at, r.generated_tokens)
        elif reason == "error":
            self.metrics.failed("engine error")
        elif reason == "cancelled":
            self.metrics.failed("cancelled")

    def _request(self, r) -> GenerationRequest:
        ids = io.array(r, "input_ids").reshape(-1)
        if ids.size == 0:
            raise RequestError("input_ids is empty: send at least one token")
        length = io.scalar(r, "input_lengths", int)
        if length is None or not 0 < length <= ids.size:
            raise RequestError(f"input_lengths must be between 1 and the {ids.size} input_ids sent")
        bad = io.array(r, "bad_words_list")
        if bad is not None and list_to_words(bad):
            raise RequestError("bad_words is not supported by the CPU engine: remove it, or serve a GPU engine")
        stops = io.array(r, "stop_words_list")
        top_k = io.scalar(r, "runtime_top_k", int)
        temperature = io.scalar(r, "temperature", float)
        greedy = top_k in (None, 1)
        sampling = check_sampling(top_k, io.scalar(r, "runtime_top_p", float),
                                  None if greedy else (temperature if temperature is not None else 1.0),
                                  io.scalar(r, "seed", int))
        penalties = check_penalties(io.scalar(r, "presence_penalty", float), io.scalar(r, "frequency_penalty", float))
        guide = check_guide(io.one_string(r, "guided_decoding_guide_type"), io.one_string(r, "guided_decoding_guide"))
        sender = r.get_response_sender()

        key = r.request_id()
        outputs = io.requested_outputs(r)

        def on_tokens(new_ids, final, reason):
            if final:
                self._observe(request, reason)
            if reason == "cancelled":
                pb_utils.Logger.log_info(f"engine: request {key or '(no id)'} cancelled by the client")
            if reason == "error":
                sender.send(io.error_response("the engine failed on this request; retry it", internal=True), flags=FINAL)
                return
            if reason == "refused":
                sender.send(io.error_response(request.refusal), flags=FINAL)
                return
            out = np.asarray(new_ids, dtype=np.int32).reshape(1, 1, -1)
            response = pb_utils.InferenceResponse(io.tensors({
                "output_ids": out,
                "sequence_length": np.array([[len(new_ids)]], dtype=np.int32),
            }, batch=False, only=outputs))
            sender.send(response, flags=FINAL if final else 0)

        end_id = io.scalar(r, "end_id", int)
        if end_id is None:
            raise RequestError("end_id is required by the engine")
        if guide is not None and end_id < 0:
            raise RequestError("end_id -1 cannot be combined with guided decoding: send the model's end token id")
        request = GenerationRequest(
            input_ids=ids[:length].tolist(),
            max_new_tokens=io.scalar(r, "request_output_len", int) or 0,
            end_id=end_id,
            sampling=sampling,
            on_tokens=on_tokens,
            stop_sequences=list_to_words(stops) if stops is not None else [],
            streaming=bool(io.scalar(r, "streaming", bool)),
            is_cancelled=lambda: io.is_cancelled(r),
            key=key,
            penalties=penalties,
            json_schema=guide.guide if guide is not None else None,
        )
        return request

    def execute(self, requests):
        for r in requests:
            try:
                if io.scalar(r, "stop", bool):
                    self.engine.stop(r.request_id())
                    r.get_response_sender().send(flags=FINAL)
                    continue
                io.send_ack(r)      # before any token: the caller's wait moves out of exec() (triton_io)
                self.engine.submit(self._request(r))
            except RequestError as e:
                r.get_response_sender().send(io.error_response(str(e)), flags=FINAL)
            except Exception as e:
                self.metrics.failed("engine error")
                pb_utils.Logger.log_error(f"engine: {e!r}")
                r.get_response_sender().send(io.error_response(f"internal error in engine: {e}", internal=True),
                                             flags=FINAL)
        return None

    def finalize(self):
        self.engine.shutdown()
        # A request's callback refers to its GenerationRequest (a cycle holding the Triton request
        # and its sender): collected now, while the stub's shared memory is still mapped, not by
        # the interpreter's teardown after it is gone (a segfault on every unload).
        gc.collect()
