"""Small checkpoints tests build themselves."""

from __future__ import annotations

import shutil
from pathlib import Path


def make_tiny_llama(target: Path, tokenizer_dir: Path, hidden_size: int = 64, context: int = 512) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer: exactness on a second checkpoint, in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(target, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir) / name, target / name)
    return target


def make_tiny_roberta(target: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer RoBERTa (plain transformers layout: build it with a --pooling) with MiniLM's
    tokenizer: an embedding deployment that builds and loads in seconds."""
    import torch
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=130, pad_token_id=0, type_vocab_size=1)
    RobertaModel(config, add_pooling_layer=False).eval().save_pretrained(target, safe_serialization=True)
    shutil.copyfile(Path(tokenizer_dir) / "tokenizer.json", target / "tokenizer.json")
    return target
