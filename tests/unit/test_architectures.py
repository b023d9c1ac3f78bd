"""Every LLM architecture we claim builds and generates exactly what transformers generates: tiny
random Llama-family checkpoints, built by build-engines at fp32, run by the CPU engine in-process."""

from __future__ import annotations

import queue
import shutil

import pytest

from backends.contract.naming import DeploymentName
from backends.llm_engine import ContinuousBatchingEngine, GenerationRequest
from backends.sampling import Sampling
from backends.tokenization import ModelTokenizer
from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.build.sources.checkpoint import SUPPORTED_LLM_ARCHITECTURES

pytestmark = pytest.mark.slow
COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3, bos_token_id=1,
              eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)


def _model(arch: str):
    import transformers

    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return getattr(transformers, arch)(config_cls(**COMMON)).eval()


def _engine_greedy(engine, ids, n, eos):
    out: queue.Queue = queue.Queue()
    engine.submit(GenerationRequest(ids, n, eos, Sampling(), lambda new, final, reason: out.put((new, final))))
    while True:
        new, final = out.get(timeout=120)
        if final:
            return new


@pytest.mark.parametrize("arch", [a for a in SUPPORTED_LLM_ARCHITECTURES if a != "LlamaForCausalLM"])
def test_architecture_greedy_equals_transformers(arch, tmp_path, smollm2, build_cache):
    import torch

    torch.manual_seed(1)
    src = tmp_path / arch
    model = _model(arch)
    model.save_pretrained(src, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2.hf_dir / name, src / name)
    name = arch.lower().replace("forcausallm", "")
    build([DeploymentSpec(name, source=str(src), precisions=["fp32"], context_size=256, max_batch_size=2)],
          BuildOptions(output=tmp_path / "repo", cache_dir=build_cache, echo=lambda _: None))
    engine_dir = tmp_path / "repo" / DeploymentName(name, "fp32").llm_engine / "1" / "engine"
    engine = ContinuousBatchingEngine(engine_dir, 256, 2)
    try:
        tok = ModelTokenizer.load(src)
        for prompt in ("Once upon a time", "def add(a, b):", "Le chat est"):
            ids = tok.encode(prompt)
            with torch.no_grad():
                ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                                     pad_token_id=2, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            assert _engine_greedy(engine, ids, 24, 2) == ref[0, len(ids):].tolist(), (arch, prompt)
    finally:
        engine.shutdown()
