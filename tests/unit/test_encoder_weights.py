"""Compressed encoder weights are expanded to f32 at load only where no kernel of the host computes
on them (backends.encoder_weights), with the same outputs, and the decision travels with the
build's compiled blob."""

import numpy as np
import openvino as ov
import pytest
from openvino import opset13 as op

from backends import cpu_isa
from backends import embedding as emb
from backends.encoder_weights import compressed_weights, computes_on, expand_at_load, expanded

FEEDS = {"input_ids": np.array([[1, 5, 7, 0], [3, 2, 0, 0]], dtype=np.int64),
         "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.int64)}


def _encoder(weights: str) -> ov.Model:
    """A tiny encoder whose projection is f32, f16 (decompressed by a Convert) or int8 (u8 with a
    zero point and per-channel scales, the layout nncf writes)."""
    rng = np.random.default_rng(0)
    ids = op.parameter([-1, -1], np.int64, name="input_ids")
    mask = op.parameter([-1, -1], np.int64, name="attention_mask")
    x = op.gather(op.constant(rng.standard_normal((100, 16)).astype(np.float32)), ids, op.constant(np.int64(0)))
    w = rng.standard_normal((16, 16)).astype(np.float32)
    if weights == "f16":
        w = op.convert(op.constant(w.astype(np.float16)), np.float32)
    elif weights == "f8":
        w = op.convert(op.constant(w, dtype=ov.Type.f8e4m3), np.float32)
    elif weights == "int8":
        scale = (np.abs(w).max(axis=0, keepdims=True) / 127).astype(np.float32)
        q = (np.round(w / scale) + 128).astype(np.uint8)
        w = op.multiply(op.subtract(op.convert(op.constant(q), np.float32), op.constant(np.float32(128))),
                        op.constant(scale))
    else:
        w = op.constant(w)
    y = op.multiply(op.tanh(op.matmul(x, w, False, False)), op.unsqueeze(op.convert(mask, np.float32), -1))
    return ov.Model([y], [ids, mask], "tiny_encoder")


def _saved(tmp_path, weights: str):
    xml = tmp_path / "openvino_model.xml"
    ov.save_model(_encoder(weights), xml, compress_to_fp16=False)
    return xml


@pytest.mark.parametrize("weights, families", [("f32", set()), ("f16", {"f16"}), ("int8", {"int8"}), ("f8", {"f8"})])
def test_the_compressed_weight_families_are_read_off_the_graph(weights, families):
    assert compressed_weights(_encoder(weights)) == families


@pytest.mark.parametrize("family, compute, isa, kept", [
    ("int8", "f32", "avx2", False),          # no dynamic quantization without AVX-512: decompressed per call
    ("int8", "f32", "avx512", True),
    ("int8", "f32", "avx512_bf16", True),
    ("f8", "bf16", "avx512_bf16", True),     # fp8 weights under bf16 compute
    ("f8", "bf16", "avx2", False),           # no bf16 here: f32 compute decompresses them
    ("f8", "f32", "amx", False),
    ("f16", "f32", "avx512_bf16", False),
    ("f16", "f32", "baseline", False),
])
def test_weights_are_kept_compressed_only_where_a_kernel_computes_on_them(family, compute, isa, kept):
    assert computes_on(family, compute, isa) is kept


def test_an_uncompressed_model_is_never_expanded():
    assert not expand_at_load(_encoder("f32"), "f32", "avx2")


def test_fp8_is_expanded_only_where_bf16_compute_runs():
    assert not expand_at_load(_encoder("f8"), "bf16", "avx512_bf16")
    assert expand_at_load(_encoder("f8"), "bf16", "avx512")


@pytest.mark.parametrize("weights", ["f16", "int8"])
def test_expanded_weights_give_the_compressed_engine_s_outputs(weights):
    core = ov.Core()
    compressed = core.compile_model(_encoder(weights), "CPU", {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"})
    model = expanded(_encoder(weights))
    assert compressed_weights(model) == set()
    assert not [o for o in model.get_ops() if o.get_type_name() == "Convert" and
                o.input_value(0).get_node().get_type_name() == "Constant"]
    out = core.compile_model(model, "CPU")(FEEDS)[0]
    np.testing.assert_allclose(out, compressed(FEEDS)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("isa, expected", [("avx2", True), ("avx512_bf16", False)])
def test_the_encoder_expands_int8_by_host_class_and_its_blob_says_so(tmp_path, monkeypatch, isa, expected):
    from backends import encoder_weights

    monkeypatch.setattr(cpu_isa, "host_isa_class", lambda: isa)
    folded = []
    monkeypatch.setattr(encoder_weights, "expanded", lambda m: folded.append(m) or expanded(m))
    xml = _saved(tmp_path, "int8")
    fresh = emb.OpenVinoEncoder(xml, "f32")
    assert fresh.weights_expanded is expected and not fresh.imported
    assert len(folded) == int(expected)
    emb.export_compiled(xml, "f32")
    imported = emb.OpenVinoEncoder(xml, "f32")
    assert imported.imported and imported.weights_expanded is expected
    np.testing.assert_allclose(imported(FEEDS), fresh(FEEDS), rtol=0, atol=1e-6)


def test_an_f32_encoder_is_compiled_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_isa, "host_isa_class", lambda: "avx2")
    assert emb.OpenVinoEncoder(_saved(tmp_path, "f32"), "f32").weights_expanded is False


def test_a_blob_from_before_the_rule_is_compiled_again(tmp_path, monkeypatch):
    """A key without `weights_expanded` (built before expansion existed) may hold compressed weights
    this host would expand: it is not imported."""
    import json

    monkeypatch.setattr(cpu_isa, "host_isa_class", lambda: "avx2")
    xml = _saved(tmp_path, "int8")
    emb.export_compiled(xml, "f32")
    key = xml.parent / emb.COMPILED_KEY
    data = json.loads(key.read_text())
    del data[emb.WEIGHTS_EXPANDED]
    key.write_text(json.dumps(data))
    encoder = emb.OpenVinoEncoder(xml, "f32")
    assert not encoder.imported and encoder.weights_expanded is True
