"""Load a CPU LLM engine in this process and generate a few greedy tokens: which runtime setting
it picked (backends.cpu_runtime) and that it runs. A module, so a test can run it in a process
whose ONEDNN_MAX_CPU_ISA caps the kernels (stdin: JSON job, stdout: JSON result)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from backends.llm_engine import ContinuousBatchingEngine, GenerationRequest
from backends.sampling import Sampling
from backends.tokenization import ModelTokenizer


def run(engine_dir: Path, text: str, new_tokens: int = 8) -> dict:
    engine = ContinuousBatchingEngine(engine_dir, 256, 1)
    done, out = threading.Event(), []

    def on_tokens(ids, final, _reason):
        out.extend(ids)
        if final:
            done.set()

    engine.submit(GenerationRequest(ModelTokenizer.load(engine_dir).encode(text), new_tokens, -1, Sampling(), on_tokens))
    done.wait(300)
    engine.shutdown()
    return {"runtime": engine.runtime.as_dict(), "ids": out}


if __name__ == "__main__":
    job = json.loads(sys.stdin.read())
    print(json.dumps(run(Path(job["engine"]), job["text"])))
