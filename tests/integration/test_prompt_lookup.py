"""Prompt-lookup decoding on the real SmolLM2 engine (in-process, the session's fp32 build): an
answer that copies its prompt comes out token for token as without it, in fewer steps."""

from __future__ import annotations

import threading

from conftest import LLM_NAME

from backends.contract.naming import DeploymentName
from backends.llm_engine import ContinuousBatchingEngine, GenerationRequest, PromptLookup
from backends.sampling import Sampling
from backends.tokenization import ModelTokenizer

TEXT = ("Triton Inference Server serves models from a repository. Each model has a folder with a "
        "configuration and one folder per version. The server loads the models it is asked to load, "
        "and answers requests over HTTP and gRPC.")
PROMPT = f"<|im_start|>user\nRepeat this text word for word:\n\n{TEXT}<|im_end|>\n<|im_start|>assistant\n"


def generate(engine: ContinuousBatchingEngine, ids: list[int], end_id: int,
             stops: list[list[int]] | None = None) -> tuple[list[list[int]], str]:
    chunks, done, why = [], threading.Event(), []

    def on_tokens(new, final, reason):
        chunks.append(list(new))
        if final:
            why.append(reason)
            done.set()

    engine.submit(GenerationRequest(ids, 64, end_id, Sampling(), on_tokens, streaming=True, stop_sequences=stops or []))
    assert done.wait(120)
    return [c for c in chunks if c], why[0]


def test_an_answer_that_copies_the_prompt_is_unchanged_takes_far_fewer_steps_and_stops_mid_step(llm_repository):
    dep = DeploymentName(LLM_NAME, "fp32")
    tokenizer = ModelTokenizer.load(llm_repository / dep.preprocessing / "1" / "tokenizer")
    engine_dir, ids = llm_repository / dep.llm_engine / "1" / "engine", tokenizer.encode(PROMPT)
    plain_engine = ContinuousBatchingEngine(engine_dir, 1024, 2)
    lookup_engine = ContinuousBatchingEngine(engine_dir, 1024, 2, prompt_lookup=PromptLookup())
    try:
        plain_chunks, _ = generate(plain_engine, ids, tokenizer.eos_token_id)
        chunks, _ = generate(lookup_engine, ids, tokenizer.eos_token_id)
        plain = [i for c in plain_chunks for i in c]
        # a two-token stop sequence from the middle of the answer, which lookup steps jump over
        stop = plain[25:27]
        first = next(i for i in range(len(plain) - 1) if plain[i:i + 2] == stop)
        stopped, reason = generate(lookup_engine, ids, tokenizer.eos_token_id, [stop])
    finally:
        plain_engine.shutdown()
        lookup_engine.shutdown()
    assert "Triton Inference Server serves models" in tokenizer.decode(plain)
    assert [i for c in chunks for i in c] == plain            # greedy output unchanged at fp32
    assert len(chunks) < len(plain_chunks) / 2, (len(chunks), len(plain_chunks))   # several tokens a step
    assert [i for c in stopped for i in c] == plain[:first + 2] and reason == "stop"
