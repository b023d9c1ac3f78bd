"""The resident memory of a CPU engine, measured at build time: the engine runs in a subprocess
(the same code and runtime settings as its Triton stub, on this host's ISA class), and its RSS is
read after the load and again after a load test: for an LLM LOAD_TEST_CLIENTS concurrent requests
of about LOAD_TEST_PROMPT prompt tokens, for an embedding encoder its largest batch (max_batch_size
texts of the longest length, chunked as served). The manifest records both; the scale-to-zero
memory budget (builder/serve/gateway/lifecycle.py) starts from them until serving measures the
live stubs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from backends.embedding import EmbeddingConfig
from backends.errors import BuildError

LOAD_TEST_CLIENTS = 8
LOAD_TEST_PROMPT = 1000
LOAD_TEST_NEW_TOKENS = 16
TIMEOUT_S = 900


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def load_test(engine_dir: Path, context_size: int, max_batch_size: int, clients: int = LOAD_TEST_CLIENTS,
              prompt: int = LOAD_TEST_PROMPT, new_tokens: int = LOAD_TEST_NEW_TOKENS,
              properties: dict | None = None, prompt_lookup: bool = False) -> dict:
    """Run in this process: load the engine, serve `clients` concurrent requests, report RSS."""
    from backends.llm_engine import ContinuousBatchingEngine, GenerationRequest, PromptLookup
    from backends.sampling import Sampling

    engine = ContinuousBatchingEngine(engine_dir, context_size, max_batch_size, properties=properties,
                                      prompt_lookup=PromptLookup() if prompt_lookup else None)
    loaded = rss_bytes()
    prompt = max(1, min(prompt, context_size - new_tokens - 1))
    done = threading.Semaphore(0)
    generated = []

    def on_tokens(ids, final, reason):
        if final:
            generated.append((len(ids), reason))
            done.release()

    for i in range(clients):   # different prompts: no request shares another's KV blocks
        ids = [(7 + 31 * i + 17 * k) % 20000 + 100 for k in range(prompt)]
        engine.submit(GenerationRequest(ids, new_tokens, -1, Sampling(), on_tokens))
    for _ in range(clients):
        if not done.acquire(timeout=TIMEOUT_S):
            break
    after = rss_bytes()
    engine.shutdown()
    return {"loaded_bytes": loaded, "after_load_test_bytes": after, "setting": engine.runtime.as_dict(),
            "load_test": f"{clients} concurrent requests of {prompt} prompt + {new_tokens} new tokens",
            "completed": sum(1 for n, reason in generated if reason in ("length", "stop"))}


def encoder_load_test(engine_dir: Path, inference_precision: str, texts: int, config: EmbeddingConfig) -> dict:
    """Run in this process: load the encoder as its stub does (the compiled blob when it fits this
    host), encode and pool its largest batch (`texts` of the longest length) as the stub does, and
    report the RSS after the load and the peak (the batch's token embeddings and pooling's copy of
    them are held at once)."""
    import numpy as np

    from backends.embedding import CHUNK_TEXTS, CHUNK_TOKENS, OpenVinoEncoder, encode_batches, sentence_embeddings

    encoder = OpenVinoEncoder(Path(engine_dir) / "openvino_model.xml", inference_precision)
    loaded = rss_bytes()
    checkpoint = Path(engine_dir) / "config.json"
    vocab = int(json.loads(checkpoint.read_text()).get("vocab_size", 1000)) if checkpoint.is_file() else 1000
    length = config.max_length
    ids = (np.arange(texts * length, dtype=np.int64).reshape(texts, length) * 7) % max(vocab - 1, 1) + 1
    feeds = {name: ids if name == "input_ids" else
             np.ones_like(ids) if name == "attention_mask" else np.zeros_like(ids) for name in config.encoder_inputs}
    (hidden,) = encode_batches([feeds], encoder, CHUNK_TEXTS, CHUNK_TOKENS)
    sentence_embeddings(hidden, feeds["attention_mask"], config)
    return {"loaded_bytes": loaded, "after_load_test_bytes": rss_bytes("VmHWM"),
            "load_test": f"{texts} texts of {length} tokens (peak)"}


def measure(engine_dir: Path, context_size: int, max_batch_size: int, prompt_lookup: bool = False) -> dict:
    """load_test in a fresh subprocess (this process has the build's other engines in memory), on
    the pipeline the deployment serves with."""
    return _in_subprocess({"engine": str(engine_dir), "context_size": context_size, "max_batch_size": max_batch_size,
                           "prompt_lookup": prompt_lookup})


def measure_encoder(engine_dir: Path, inference_precision: str, max_batch_size: int, config: EmbeddingConfig) -> dict:
    """encoder_load_test in a fresh subprocess."""
    return _in_subprocess({"encoder": str(engine_dir), "inference_precision": inference_precision,
                           "texts": max_batch_size, "config": config.to_json()})


def _in_subprocess(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", __name__], check=False, input=json.dumps(args), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
        raise BuildError(f"measuring the engine's memory failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    args = json.loads(sys.stdin.read())
    if "encoder" in args:
        print(json.dumps(encoder_load_test(Path(args["encoder"]), args["inference_precision"], args["texts"],
                                           EmbeddingConfig.from_json(args["config"]))))
    else:
        print(json.dumps(load_test(Path(args["engine"]), args["context_size"], args["max_batch_size"],
                                   prompt_lookup=args.get("prompt_lookup", False))))
