"""GGUF file -> Hugging Face checkpoint directory.

The engine builders (optimum-intel, TensorRT-LLM) read Hugging Face layouts, so a GGUF source is
dequantized to float32 once and written as config.json + model.safetensors + tokenizer files.
Tensors are read and dequantized with the `gguf` package. The tokenizer is rebuilt with
`tokenizers` the way llama.cpp reads the metadata (that is what the file means), not the way
transformers' GGUF loader does: it ignores `tokenizer.ggml.pre`, so it misses SmolLM's digit split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from backends.errors import SourceError, UnsupportedModelError

SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = ("llama",)
SUPPORTED_TOKENIZER_MODELS: tuple[str, ...] = ("gpt2",)

# tokenizer.ggml.pre -> does llama.cpp split every digit off before the GPT-2 regex? (llama-vocab.cpp:
# these pre types use exactly the GPT-2 regex, the second group preceded by "\p{N}".)
_PRE_SPLITS_DIGITS: dict[str, bool] = {
    **dict.fromkeys(("gpt2", "mpt", "olmo", "jais", "trillion", "granite-docling"), False),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), True),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_SPECIAL_TYPES = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
_REEXPORT = "re-export it with llama.cpp's convert_hf_to_gguf.py"
_USE_HF = "use the Hugging Face checkpoint instead"
_MISSING = object()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json,
    generation_config.json into out_dir (created; must not already contain files) and return out_dir.

    Everything is read and checked before the first file is written, so bad input leaves no
    half-written directory behind.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SourceError(f"output directory {out_dir} already exists and is not an empty directory; "
                          "pass a new or empty directory.")
    reader = _open(gguf_path)
    meta = _Metadata(reader, gguf_path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}); {_USE_HF}.")

    config = _llama_config(meta)
    tensors = _llama_tensors(reader, config, gguf_path)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    tokenizer = _tokenizer(meta)
    files: dict[str, dict[str, Any]] = {
        "config.json": config,
        "tokenizer_config.json": _tokenizer_config(meta, config["max_position_embeddings"]),
        "generation_config.json": {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
        },
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    for name, data in files.items():
        (out_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def _open(path: Path) -> gguf.GGUFReader:
    """Open the file; any parse failure means 'not a (valid) GGUF', which the user can act on."""
    if not path.is_file():
        raise SourceError(f"GGUF file {path} does not exist or is not a file; check the path.")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                          "pass a .gguf file exported by llama.cpp.") from None


class _Metadata:
    """Cached access to the GGUF key/value metadata; a missing required key is a SourceError."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self._fields = reader.fields
        self._path = path
        self._cache: dict[str, Any] = {}

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self._cache:
            return self._cache[key]
        field = self._fields.get(key)
        if field is None:
            if default is _MISSING:
                raise SourceError(f"{self._path.name}: GGUF metadata key {key!r} is missing; {_REEXPORT}.")
            return default
        try:
            value = self._cache[key] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise SourceError(f"{self._path.name}: GGUF metadata key {key!r} is unreadable ({exc}); "
                              f"{_REEXPORT}.") from None
        return value


def _float32_repr(value: float) -> float:
    """GGUF stores floats as float32: write the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _llama_config(meta: _Metadata) -> dict[str, Any]:
    """config.json for LlamaForCausalLM, key by key from llama.cpp's metadata names."""
    if meta.get("llama.rope.scaling.type", "none") != "none" or meta.get("llama.expert_count", 0):
        raise UnsupportedModelError(f"GGUF llama variants with RoPE scaling or experts are not supported; "
                                    f"{_USE_HF}.")
    heads = int(meta.get("llama.attention.head_count"))
    hidden = int(meta.get("llama.embedding_length"))
    rotary_dim = meta.get("llama.rope.dimension_count", hidden // heads)
    head_dim = int(meta.get("llama.attention.key_length", rotary_dim))
    if int(rotary_dim) != head_dim:
        raise UnsupportedModelError(f"GGUF llama with partial rotary embeddings is not supported; {_USE_HF}.")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(meta.get("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.get("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_repr(meta.get("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_repr(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("llama.context_length")),
        "vocab_size": int(meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens")))),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id", None)
        if token_id is not None:
            config[key] = int(token_id)
    return config


def _llama_tensors(reader: gguf.GGUFReader, config: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 under its HF name, undoing llama.cpp's Q/K row permutation."""
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        try:
            weights = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"{path.name}: tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which the "
                "gguf package cannot dequantize; use a GGUF quantized as F32/F16/BF16/Q4_0/Q4_1/Q8_0 or a K-quant."
            ) from None
        if name.endswith("q_proj.weight"):
            weights = _unpermute(weights, config["num_attention_heads"], config["head_dim"], tensor.name, path)
        elif name.endswith("k_proj.weight"):
            weights = _unpermute(weights, config["num_key_value_heads"], config["head_dim"], tensor.name, path)
        out[name] = weights
    embed = out.get("model.embed_tokens.weight")
    expected = (config["vocab_size"], config["hidden_size"])
    if embed is None or embed.shape != expected:
        shape = None if embed is None else embed.shape
        raise SourceError(f"{path.name}: token_embd.weight has shape {shape}, metadata implies {expected}; "
                          f"{_REEXPORT}.")
    return out


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}.weight"
    raise UnsupportedModelError(f"{path.name}: tensor {gguf_name} has no Llama counterpart "
                                f"(biases, rope_freqs and experts are not supported); {_USE_HF}.")


def _unpermute(weights: np.ndarray, n_heads: int, head_dim: int, name: str, path: Path) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's permute(): llama.cpp interleaves each head's two rotary halves."""
    if weights.ndim != 2 or weights.shape[0] != n_heads * head_dim:
        raise SourceError(f"{path.name}: {name} has shape {weights.shape}, metadata implies "
                          f"{n_heads * head_dim} rows; {_REEXPORT}.")
    rows = weights.reshape(n_heads, head_dim // 2, 2, weights.shape[1])
    return np.ascontiguousarray(rows.swapaxes(1, 2).reshape(weights.shape))


def _tokenizer(meta: _Metadata) -> Tokenizer:
    """Byte-level BPE from tokens + merges, pre-tokenized the way llama.cpp does for this pre type."""
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise UnsupportedModelError(f"GGUF tokenizer model {model!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)}); {_USE_HF}.")
    pre = meta.get("tokenizer.ggml.pre", None)
    if pre not in _PRE_SPLITS_DIGITS:
        raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported "
                                    f"(supported: {', '.join(_PRE_SPLITS_DIGITS)}); {_USE_HF}.")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges")]
    if len(vocab) != len(tokens) or len(types) != len(tokens) or any(len(m) != 2 for m in merges):
        raise SourceError(f"GGUF tokenizer has duplicate tokens or malformed merges; {_REEXPORT}.")

    tokenizer = Tokenizer(models.BPE(vocab, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if _PRE_SPLITS_DIGITS[pre] else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Added tokens keep their vocabulary ids (the contents are already in `vocab`).
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, t in enumerate(types) if t in _SPECIAL_TYPES])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, t in enumerate(types) if t == gguf.TokenType.USER_DEFINED])

    bos, eos = (_special_token(meta, tokens, k) if meta.get(f"tokenizer.ggml.add_{k}_token", False) else None
                for k in ("bos", "eos"))
    if bos or eos:
        def sequence(name: str) -> list[str]:
            return [*([bos[0]] if bos else []), name, *([eos[0]] if eos else [])]

        tokenizer.post_processor = processors.TemplateProcessing(
            single=sequence("$A"),
            pair=sequence("$A") + [f"{piece}:1" for piece in sequence("$B")],
            special_tokens=[end for end in (bos, eos) if end],
        )
    return tokenizer


def _special_token(meta: _Metadata, tokens: list[str], name: str) -> tuple[str, int] | None:
    """(content, id) of tokenizer.ggml.<name>_token_id, or None when the GGUF names none."""
    token_id = meta.get(f"tokenizer.ggml.{name}_token_id", None)
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise SourceError(f"GGUF tokenizer.ggml.{name}_token_id {token_id} is outside the vocabulary; "
                          f"{_REEXPORT}.")
    return tokens[int(token_id)], int(token_id)


def _tokenizer_config(meta: _Metadata, context_length: int) -> dict[str, Any]:
    """tokenizer_config.json: special tokens, BOS/EOS policy and chat template, as the GGUF says."""
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"),
                      ("unk_token", "unknown")):
        special = _special_token(meta, tokens, name)
        if special is not None:
            config[key] = special[0]
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    config["clean_up_tokenization_spaces"] = False  # byte-level BPE round-trips exactly; cleanup alters text
    config["model_max_length"] = context_length
    chat_template = meta.get("tokenizer.chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config
