"""`make demo`: build the embedded default models at int8, serve them with a real Triton, ask the
LLM a question (plain and streamed), embed two sentences, print their similarity, shut down."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from backends.contract.naming import DeploymentName
from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.build.sources.checkpoint import DEFAULT_EMBEDDING_NAME, DEFAULT_LLM_NAME
from builder.serve.embedding_client import embed_texts
from builder.serve.ports import free_ports
from builder.serve.triton_server import Ports, TritonServer

QUESTION = "What is the capital of France, and what is it famous for?"
SENTENCES = ("A cat sits on the warm windowsill.", "A kitten is resting in the sun by the window.")


def ask(url: str, model: str, question: str, max_tokens: int = 64) -> str:
    import json

    import tritonclient.http as httpclient

    messages = json.dumps([{"role": "user", "content": question}])
    inputs = []
    for name, value, dtype, np_type in (("messages", messages.encode(), "BYTES", object),
                                        ("max_tokens", max_tokens, "INT32", np.int32)):
        t = httpclient.InferInput(name, [1, 1], dtype)
        t.set_data_from_numpy(np.array([[value]], dtype=np_type))
        inputs.append(t)
    with httpclient.InferenceServerClient(url) as client:
        return client.infer(model, inputs).as_numpy("text_output").reshape(-1)[0].decode()


def stream(url: str, model: str, question: str, max_tokens: int = 48) -> None:
    import json
    import queue

    import tritonclient.grpc as grpcclient

    done: queue.Queue = queue.Queue()
    inputs = []
    for name, value, dtype, np_type in (("messages", json.dumps([{"role": "user", "content": question}]).encode(),
                                         "BYTES", object), ("max_tokens", max_tokens, "INT32", np.int32)):
        t = grpcclient.InferInput(name, [1, 1], dtype)
        t.set_data_from_numpy(np.array([[value]], dtype=np_type))
        inputs.append(t)
    client = grpcclient.InferenceServerClient(url)

    def on_response(result, error):
        if error is not None:
            done.put(error)
            return
        text = result.as_numpy("text_output").reshape(-1)[0].decode()
        print(text, end="", flush=True)
        if result.as_numpy("finish_reason").reshape(-1)[0]:
            done.put(None)

    client.start_stream(callback=on_response)
    client.async_stream_infer(model, inputs)
    error = done.get(timeout=300)
    client.stop_stream()
    client.close()
    print()
    if error is not None:
        raise RuntimeError(str(error))


def main() -> int:
    out = Path("demo-output")
    repo = out / "repository"
    llm = DeploymentName(DEFAULT_LLM_NAME, "int8")
    emb = DeploymentName(DEFAULT_EMBEDDING_NAME, "int8")
    print(f"== build-engines: {llm} and {emb} -> {repo}")
    t0 = time.monotonic()
    result = build([DeploymentSpec(DEFAULT_LLM_NAME, precisions=["int8"], context_size=2048),
                    DeploymentSpec(DEFAULT_EMBEDDING_NAME, kind="embedding", precisions=["int8"])],
                   BuildOptions(output=repo, cache_dir=out / "cache"))
    print(f"   {len(result.built)} built, {len(result.up_to_date)} up to date ({time.monotonic() - t0:.0f} s)")
    ports = Ports(*free_ports(3))
    print(f"== serve: tritonserver on 127.0.0.1:{ports.http} (HTTP) and :{ports.grpc} (gRPC)")
    with TritonServer(repo, ports, log_path=out / "triton.log") as server:
        print(f"== {llm} (tritonclient HTTP infer): {QUESTION}")
        print("   " + ask(server.http_url, llm.llm, QUESTION).strip().replace("\n", "\n   "))
        print(f"== {llm} (gRPC streaming): Name three rivers in Europe.")
        print("   ", end="")
        stream(server.grpc_url, llm.llm_stream, "Name three rivers in Europe.")
        vectors = embed_texts(server.http_url, emb.embedding, list(SENTENCES))
        similarity = float(vectors[0] @ vectors[1] / (np.linalg.norm(vectors[0]) * np.linalg.norm(vectors[1])))
        print(f"== {emb}: cosine similarity {similarity:.4f}")
        for s in SENTENCES:
            print(f"   - {s}")
    print("== stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
