"""`make demo`: build the embedded default models at int8, serve them as users do (`serverless-triton
serve`: nginx, the OpenAI gateway, Triton), create an API key, ask the LLM with the openai client
(plain and streamed) and over gRPC, embed two sentences, print their similarity, shut down."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from openai import OpenAI

from backends.contract.naming import DeploymentName
from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.build.sources.checkpoint import DEFAULT_EMBEDDING_NAME, DEFAULT_LLM_NAME
from builder.serve.ports import free_ports

QUESTION = "What is the capital of France, and what is it famous for?"
SENTENCES = ("A cat sits on the warm windowsill.", "A kitten is resting in the sun by the window.")


def start_serve(repo: Path, state: Path, log: Path) -> tuple[subprocess.Popen, int, int]:
    """`serverless-triton serve` (nginx, the OpenAI gateway, Triton) on free loopback ports."""
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "builder", "serve", "-r", str(repo), "--http-port", str(http), "--grpc-port",
           str(grpc), "--metrics-port", str(metrics), "--public-address", "127.0.0.1", "--state-dir", str(state),
           "--log-file", str(log)]
    out = open(log.with_name("serve.out"), "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while b"Ctrl-C to stop." not in log.with_name("serve.out").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("serve did not start: " + log.with_name("serve.out").read_text()[-2000:])
        time.sleep(0.2)
    return proc, http, grpc


def create_key(state: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "builder", "api-keys", "create", f"demo-{int(time.time())}",
                             "--state-dir", str(state)], capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def grpc_stream(url: str, model: str, question: str, key: str, max_tokens: int = 48) -> None:
    """Token streaming over gRPC with tritonclient, the key in the call's metadata."""
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
        print(result.as_numpy("text_output").reshape(-1)[0].decode(), end="", flush=True)
        if result.as_numpy("finish_reason").reshape(-1)[0]:
            done.put(None)

    client.start_stream(callback=on_response, headers={"authorization": f"Bearer {key}"})
    client.async_stream_infer(model, inputs)
    error = done.get(timeout=300)
    client.stop_stream()
    client.close()
    print()
    if error is not None:
        raise RuntimeError(str(error))


def main() -> int:
    out = Path("demo-output")
    repo, state = out / "repository", out / "state"
    llm = DeploymentName(DEFAULT_LLM_NAME, "int8")
    emb = DeploymentName(DEFAULT_EMBEDDING_NAME, "int8")
    print(f"== build-engines: {llm} and {emb} -> {repo}")
    t0 = time.monotonic()
    result = build([DeploymentSpec(DEFAULT_LLM_NAME, precisions=["int8"], context_size=2048),
                    DeploymentSpec(DEFAULT_EMBEDDING_NAME, kind="embedding", precisions=["int8"])],
                   BuildOptions(output=repo, cache_dir=out / "cache"))
    print(f"   {len(result.built)} built, {len(result.up_to_date)} up to date ({time.monotonic() - t0:.0f} s)")
    print("== serverless-triton serve (nginx -> OpenAI gateway + Triton, API keys on)")
    proc, http, grpc = start_serve(repo, state, out / "triton.log")
    try:
        key = create_key(state)
        print(f"   http://127.0.0.1:{http}/v1 (OpenAI), gRPC 127.0.0.1:{grpc}; "
              f"api-keys create printed a key ({key[:7]}...)")
        client = OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key=key)
        print(f"== {llm} (openai chat.completions): {QUESTION}")
        answer = client.chat.completions.create(model=str(llm), messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=64, temperature=0)
        print("   " + answer.choices[0].message.content.strip().replace("\n", "\n   "))
        print(f"   usage: {answer.usage.prompt_tokens} prompt + {answer.usage.completion_tokens} completion tokens")
        print(f"== {llm} (openai, stream=True): Name three rivers in Europe.")
        print("   ", end="")
        for chunk in client.chat.completions.create(model=str(llm), stream=True, max_tokens=48, temperature=0,
                                                    messages=[{"role": "user", "content": "Name three rivers in Europe."}]):
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()
        print(f"== {llm} (tritonclient gRPC streaming, key in the metadata): Name a famous painter.")
        print("   ", end="")
        grpc_stream(f"127.0.0.1:{grpc}", llm.llm_stream, "Name a famous painter.", key)
        vectors = np.array([d.embedding for d in client.embeddings.create(model=str(emb), input=list(SENTENCES)).data])
        similarity = float(vectors[0] @ vectors[1] / (np.linalg.norm(vectors[0]) * np.linalg.norm(vectors[1])))
        print(f"== {emb} (openai embeddings): cosine similarity {similarity:.4f}")
        for s in SENTENCES:
            print(f"   - {s}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)
    print("== stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
