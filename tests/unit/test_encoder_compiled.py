"""The encoder's compiled blob (backends.embedding.COMPILED_BLOB, written at build time): imported
when it was made for this host, OpenVINO and IR, with the same outputs as a fresh compile; any
mismatch or a blob the plugin refuses falls back to compiling the IR."""

import json

import numpy as np
import openvino as ov
import pytest

from backends import embedding as emb
from tests.support.python_json import python_json


@pytest.fixture
def encoder_xml(tmp_path):
    """A tiny encoder IR with the real one's interface: int64 ids and mask in, [n, L, 8] out."""
    from openvino import opset13 as op

    ids = op.parameter([-1, -1], np.int64, name="input_ids")
    mask = op.parameter([-1, -1], np.int64, name="attention_mask")
    table = op.constant(np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32))
    x = op.gather(table, ids, op.constant(np.int64(0)))
    w = op.constant(np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32))
    y = op.multiply(op.tanh(op.matmul(x, w, False, False)), op.unsqueeze(op.convert(mask, np.float32), -1))
    model = ov.Model([y], [ids, mask], "tiny_encoder")
    xml = tmp_path / "openvino_model.xml"
    ov.save_model(model, xml, compress_to_fp16=False)
    return xml


FEEDS = {"input_ids": np.array([[1, 5, 7, 0], [3, 2, 0, 0]], dtype=np.int64),
         "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.int64)}


def test_a_matching_blob_is_imported_with_the_same_outputs(encoder_xml):
    fresh = emb.OpenVinoEncoder(encoder_xml, "f32")
    assert not fresh.imported
    emb.export_compiled(encoder_xml, "f32")
    imported = emb.OpenVinoEncoder(encoder_xml, "f32")
    assert imported.imported
    assert np.array_equal(imported(FEEDS), fresh(FEEDS))


IMPORT_AND_CALL = """
import gc, json, sys
from pathlib import Path
import numpy as np
from backends import embedding as emb
encoder = emb.OpenVinoEncoder(Path(sys.argv[1]), "f32")
gc.collect()   # nothing but the encoder holds the blob's map now
mapped = str(Path(sys.argv[1]).with_name(emb.COMPILED_BLOB)) in Path("/proc/self/maps").read_text()
feeds = {k: np.array(v, dtype=np.int64) for k, v in json.loads(sys.argv[2]).items()}
print(json.dumps({"imported": encoder.imported, "mapped": mapped, "out": [encoder(feeds).tolist() for _ in range(3)]}))
"""


def test_the_blob_is_imported_from_its_memory_map_which_lives_as_long_as_the_encoder(encoder_xml):
    """The plugin reads an imported encoder's constants from the blob's pages (no copy): a map
    released before the encoder crashed the process (measured: SIGSEGV on the first call). Run in a
    subprocess, so that a crash is this test's failure and not the end of the run."""
    fresh = emb.OpenVinoEncoder(encoder_xml, "f32")(FEEDS)
    emb.export_compiled(encoder_xml, "f32")
    got = python_json("-c", IMPORT_AND_CALL, str(encoder_xml), json.dumps({k: v.tolist() for k, v in FEEDS.items()}))
    assert got["imported"] and got["mapped"]
    assert all(np.array_equal(np.array(out, dtype=np.float32), fresh) for out in got["out"])


@pytest.mark.parametrize("change", ["openvino", "isa_class", "properties", "xml_sha256", "bin_bytes"])
def test_a_blob_for_anything_else_is_not_imported(encoder_xml, change):
    emb.export_compiled(encoder_xml, "f32")
    key = encoder_xml.parent / emb.COMPILED_KEY
    data = json.loads(key.read_text())
    data[change] = "other"
    key.write_text(json.dumps(data))
    encoder = emb.OpenVinoEncoder(encoder_xml, "f32")
    assert not encoder.imported and encoder(FEEDS).shape == (2, 4, 8)


def test_another_precision_compiles(encoder_xml):
    emb.export_compiled(encoder_xml, "f32")
    assert not emb.OpenVinoEncoder(encoder_xml, "bf16").imported


def test_a_blob_the_plugin_refuses_falls_back_to_compiling(encoder_xml):
    emb.export_compiled(encoder_xml, "f32")
    (encoder_xml.parent / emb.COMPILED_BLOB).write_bytes(b"not a compiled model")
    encoder = emb.OpenVinoEncoder(encoder_xml, "f32")
    assert not encoder.imported and encoder(FEEDS).shape == (2, 4, 8)


def test_the_build_keeps_the_blob_only_when_outputs_match(encoder_xml, monkeypatch):
    from builder.build.engines import openvino_encoder

    class Tok:   # what write_compiled needs of an EmbeddingTokenizer
        def encode(self, texts):
            return FEEDS

    assert openvino_encoder.write_compiled(encoder_xml.parent, Tok(), "f32")
    assert (encoder_xml.parent / emb.COMPILED_BLOB).is_file()
    real = emb.OpenVinoEncoder.__call__
    monkeypatch.setattr(emb.OpenVinoEncoder, "__call__",
                        lambda self, feeds: real(self, feeds) + (1.0 if self.imported else 0.0))
    assert not openvino_encoder.write_compiled(encoder_xml.parent, Tok(), "f32")
    assert not (encoder_xml.parent / emb.COMPILED_BLOB).exists()
    assert not (encoder_xml.parent / emb.COMPILED_KEY).exists()
