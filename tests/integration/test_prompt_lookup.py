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


def generate(engine: ContinuousBatchingEngine, ids: list[int], end_id: int) -> list[list[int]]:
    chunks, done = [], threading.Event()

    def on_tokens(new, final, reason):
        chunks.append(list(new))
        if final:
            done.set()

    engine.submit(GenerationRequest(ids, 64, end_id, Sampling(), on_tokens, streaming=True))
    assert done.wait(120)
    return [c for c in chunks if c]


def answer(llm_repository, lookup: PromptLookup | None) -> tuple[list[int], int, ModelTokenizer]:
    """The answer's tokens and the engine steps that produced them (one streamed chunk a step)."""
    dep = DeploymentName(LLM_NAME, "fp32")
    tokenizer = ModelTokenizer.load(llm_repository / dep.preprocessing / "1" / "tokenizer")
    engine = ContinuousBatchingEngine(llm_repository / dep.llm_engine / "1" / "engine", 1024, 2, prompt_lookup=lookup)
    try:
        chunks = generate(engine, tokenizer.encode(PROMPT), tokenizer.eos_token_id)
    finally:
        engine.shutdown()
    return [i for c in chunks for i in c], len(chunks), tokenizer


def test_an_answer_that_copies_the_prompt_is_unchanged_and_takes_far_fewer_steps(llm_repository):
    plain, plain_steps, tokenizer = answer(llm_repository, None)
    looked, steps, _ = answer(llm_repository, PromptLookup())
    assert "Triton Inference Server serves models" in tokenizer.decode(plain)
    assert looked == plain                                   # greedy output unchanged at fp32
    assert steps < plain_steps / 2, (steps, plain_steps)     # several tokens a step, verified at once
