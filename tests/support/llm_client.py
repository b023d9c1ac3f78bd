"""Small client helpers for the LLM integration tests and benchmarks (tritonclient + HTTP)."""

from __future__ import annotations

import json
import queue

import numpy as np
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

OUTPUTS = ["text_output", "prompt_tokens", "completion_tokens", "finish_reason", "notice"]
DTYPES = {"text_input": ("BYTES", object), "messages": ("BYTES", object), "stop_words": ("BYTES", object),
          "bad_words": ("BYTES", object), "max_tokens": ("INT32", np.int32), "top_k": ("INT32", np.int32),
          "end_id": ("INT32", np.int32), "pad_id": ("INT32", np.int32), "top_p": ("FP32", np.float32),
          "temperature": ("FP32", np.float32), "random_seed": ("UINT64", np.uint64), "stream": ("BOOL", np.bool_),
          "truncate": ("BOOL", np.bool_), "presence_penalty": ("FP32", np.float32),
          "frequency_penalty": ("FP32", np.float32), "guided_decoding_guide_type": ("BYTES", object),
          "guided_decoding_guide": ("BYTES", object)}


def _arrays(fields: dict) -> dict[str, np.ndarray]:
    out = {}
    for name, value in fields.items():
        _, dtype = DTYPES[name]
        values = value if isinstance(value, list) else [value]
        if dtype is object:
            values = [v.encode() if isinstance(v, str) else v for v in values]
        out[name] = np.array([values], dtype=dtype)  # [batch 1, n]
    return out


def _inputs(module, fields: dict):
    inputs = []
    for name, arr in _arrays(fields).items():
        t = module.InferInput(name, list(arr.shape), DTYPES[name][0])
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def _result(result) -> dict:
    out = {}
    for name in OUTPUTS:
        v = result.as_numpy(name).reshape(-1)[0]
        out[name] = v.decode() if isinstance(v, bytes) else int(v)
    return out


def http_infer(url: str, model: str, **fields) -> dict:
    with httpclient.InferenceServerClient(url, network_timeout=300) as c:
        return _result(c.infer(model, _inputs(httpclient, fields), outputs=[httpclient.InferRequestedOutput(n)
                                                                             for n in OUTPUTS]))


def grpc_infer(url: str, model: str, **fields) -> dict:
    with grpcclient.InferenceServerClient(url) as c:
        return _result(c.infer(model, _inputs(grpcclient, fields), client_timeout=300))


def grpc_stream(url: str, model: str, max_chunks: int | None = None, **fields) -> list[dict]:
    """Chunks of one streamed request; with max_chunks, cancel after that many."""
    responses: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        c.async_stream_infer(model, _inputs(grpcclient, fields), enable_empty_final_response=True)
        chunks = []
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                raise RuntimeError(str(error))
            final = result.get_response().parameters.get("triton_final_response")
            if result.as_numpy("text_output") is not None:
                chunks.append(_result(result))
            if final is not None and final.bool_param:
                return chunks
            if max_chunks is not None and len(chunks) >= max_chunks:
                return chunks
    finally:
        c.stop_stream(cancel_requests=True)
        c.close()


def generate(url: str, model: str, payload: dict, stream: bool = False) -> requests.Response:
    """POST to Triton's generate endpoints. `Connection: close`: a keep-alive connection left open
    would hold a stopping tritonserver for its whole exit timeout (it waits for open connections)."""
    endpoint = "generate_stream" if stream else "generate"
    return requests.post(f"http://{url}/v2/models/{model}/{endpoint}", data=json.dumps(payload), timeout=300,
                         stream=stream, headers={"Connection": "close"})


def sse_events(response: requests.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines(decode_unicode=True)
            if line and line.startswith("data:")]


def engine_ids(url: str, engine_model: str, input_ids: list[int], max_new: int, end_id: int) -> list[int]:
    """Greedy output ids straight from an engine model (decoupled: gRPC stream, streaming off)."""
    responses: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        def inp(name, arr, dt):
            t = grpcclient.InferInput(name, list(arr.shape), dt)
            t.set_data_from_numpy(arr)
            return t

        c.async_stream_infer(engine_model, [
            inp("input_ids", np.array([input_ids], np.int32), "INT32"),
            inp("input_lengths", np.array([[len(input_ids)]], np.int32), "INT32"),
            inp("request_output_len", np.array([[max_new]], np.int32), "INT32"),
            inp("end_id", np.array([[end_id]], np.int32), "INT32"),
        ])
        result, error = responses.get(timeout=300)
        if error is not None:
            raise RuntimeError(str(error))
        n = int(result.as_numpy("sequence_length").reshape(-1)[0])
        return result.as_numpy("output_ids").reshape(-1)[:n].tolist()
    finally:
        c.stop_stream()
        c.close()
