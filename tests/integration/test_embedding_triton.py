"""Embedding deployments served by a real Triton: one build (fp32, fp16, int8, fp8 of the default
all-MiniLM-L6-v2) and one server for the module. Embeddings over HTTP and gRPC against
sentence-transformers' own, the manifest's floors, bad inputs that must not hurt the model, and
Triton's dynamic batching merging concurrent requests."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from backends.contract.naming import DeploymentName
from backends.contract.precisions import PRECISIONS
from backends.embedding import cosine
from builder.build.sources.checkpoint import DEFAULT_EMBEDDING_NAME, default_embedding_dir
from builder.serve.embedding_client import embed_texts
from builder.serve.ports import free_ports
from tests.support.checkpoints import make_tiny_roberta
from tests.support.texts import EMPTY_AFTER_STRIP, varied_sentences

ALL = ["fp32", "fp16", "int8", "fp8"]
MAX_BATCH = 64
ROBERTA = "tiny-roberta"
pytestmark = pytest.mark.slow

# -- a few hundred deterministic, varied texts (no downloads) ------------------------------------
SENTENCES = varied_sentences()


def names(precision: str) -> DeploymentName:
    return DeploymentName(DEFAULT_EMBEDDING_NAME, precision)


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A random 2-layer RoBERTa, plain transformers layout (no sentence-transformers files), with
    MiniLM's tokenizer: the --pooling path and an encoder without token_type_ids, in seconds."""
    return make_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"), default_embedding_dir())


@pytest.fixture(scope="module")
def embedding_repository(tmp_path_factory, tiny_roberta):
    """One build of every precision into one repository (a fresh cache: the export runs here)."""
    from builder.build.deployment import DeploymentSpec
    from builder.build.pipeline import BuildOptions, build

    root = tmp_path_factory.mktemp("embedding")
    specs = [DeploymentSpec(DEFAULT_EMBEDDING_NAME, kind="embedding", precisions=ALL, max_batch_size=MAX_BATCH),
             DeploymentSpec(ROBERTA, kind="embedding", source=str(tiny_roberta), precisions=["fp32"], pooling="cls",
                            max_batch_size=8)]
    result = build(specs, BuildOptions(output=root / "repository", cache_dir=root / "cache", echo=lambda _: None))
    assert sorted(result.built) == sorted([str(names(p)) for p in ALL] + [f"{ROBERTA}:fp32"])
    return root / "repository"


@pytest.fixture(scope="module")
def server(embedding_repository, tmp_path_factory):
    from builder.serve.triton_server import Ports, TritonServer

    log = tmp_path_factory.mktemp("triton-embedding") / "triton.log"
    with TritonServer(embedding_repository, Ports(*free_ports(3)), cache_dir=tmp_path_factory.mktemp("backends"),
                      log_path=log) as s:
        yield s


@pytest.fixture(scope="module")
def st_embeddings() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(default_embedding_dir()), device="cpu")
    return model.encode(SENTENCES, batch_size=32, convert_to_numpy=True)


def _inputs(module, texts, truncate=None, dtype="BYTES"):
    data = np.array([t if isinstance(t, bytes) else t.encode() for t in texts], dtype=object).reshape(-1, 1)
    text = module.InferInput("text", list(data.shape), dtype)
    text.set_data_from_numpy(data)
    inputs = [text]
    if truncate is not None:
        flags = module.InferInput("truncate", [len(texts), 1], "BOOL")
        flags.set_data_from_numpy(np.array([[t] for t in truncate], dtype=np.bool_))
        inputs.append(flags)
    return inputs


def grpc_embed(url: str, model: str, texts: list[str], batch: int = MAX_BATCH) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return np.concatenate([client.infer(model, _inputs(grpcclient, texts[i:i + batch])).as_numpy("embedding")
                               for i in range(0, len(texts), batch)])
    finally:
        client.close()


def assert_healthy(server, precision: str = "int8") -> None:
    """The model is READY and answers the next request."""
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(server.http_url) as c:
        assert c.is_model_ready(names(precision).embedding)
    assert embed_texts(server.http_url, names(precision).embedding, ["still here"]).shape == (1, 384)


# -- the build ----------------------------------------------------------------------------------

def test_manifest_records_every_precision(embedding_repository):
    from backends.contract.manifest import read_manifest, verify_files

    deployments = read_manifest(embedding_repository).deployments
    sizes = {}
    for p in ALL:
        entry = deployments[str(names(p))]
        assert entry.kind == "embedding" and entry.entrypoints == {"infer": names(p).embedding}
        assert entry.triton_models == names(p).embedding_models()
        assert not verify_files(embedding_repository, entry)
        acc, floor = entry.accuracy, PRECISIONS[p]
        assert acc["reference"] == "fp32" and acc["sentences"] > 50
        assert acc["floor"] == {"min_cosine": floor.embedding_min_cosine, "mean_cosine": floor.embedding_mean_cosine}
        assert acc["min_cosine"] >= floor.embedding_min_cosine and acc["mean_cosine"] >= floor.embedding_mean_cosine
        engine = entry.engine
        assert (engine["target"], engine["format"], engine["context_size"], engine["dimension"]) == \
            ("cpu", "openvino-ir", 256, 384)
        assert engine["pooling"] == ["mean"] and engine["normalize"] and engine["max_batch_size"] == MAX_BATCH
        # measured in a subprocess under the largest batch: it grows past the load, and the need counts it
        measured = engine["memory"]
        assert measured["load_test"] == f"{MAX_BATCH} texts of 256 tokens (peak)"
        assert engine["weights_bytes"] < measured["loaded_bytes"] < measured["after_load_test_bytes"]
        assert engine["memory_bytes"] > measured["after_load_test_bytes"]      # + the tokenize stub
        sizes[p] = engine["weights_bytes"] / 2**20
    print("\nbuild accuracy vs fp32:", {p: (deployments[str(names(p))].accuracy["min_cosine"],
                                        deployments[str(names(p))].accuracy["mean_cosine"]) for p in ALL})
    assert 80 < sizes["fp32"] < 90 and 40 < sizes["fp16"] < 45 and sizes["int8"] < 23 and sizes["fp8"] < 23


def test_int8_encoder_carries_its_quantization_groups(embedding_repository):
    """int8 weights in groups of 64 input channels, and the IR tells OpenVINO to quantize
    activations in groups of 64 too (builder/build/engines/openvino_grouped_int8.py)."""
    import openvino as ov

    from backends.contract.manifest import read_manifest
    from backends.embedding import OpenVinoEncoder
    from builder.build.engines.openvino_encoder import INT8_GROUP_SIZE

    entry = read_manifest(embedding_repository).deployments[str(names("int8"))]
    assert f"groups of {INT8_GROUP_SIZE} input channels" in entry.engine["quantization"]
    xml = embedding_repository / names("int8").embedding_encoder / "1" / "engine" / "openvino_model.xml"
    encoder = OpenVinoEncoder(xml, entry.engine["compute"])
    assert int(encoder.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == INT8_GROUP_SIZE
    grouped = [op for op in ov.Core().read_model(xml).get_ops() if op.get_type_name() == "Constant"
               and op.get_output_element_type(0) == ov.Type.u8 and op.get_output_partial_shape(0).rank.get_length() == 3
               and op.get_output_partial_shape(0)[2].get_length() == INT8_GROUP_SIZE]
    assert len(grouped) == 36      # every linear layer of MiniLM's 6 blocks (q, k, v, out, ffn in, ffn out)


# -- accuracy against sentence-transformers ------------------------------------------------------

def test_fp32_equals_sentence_transformers_over_http_and_grpc(server, st_embeddings):
    model = names("fp32").embedding
    http = embed_texts(server.http_url, model, SENTENCES)          # > max_batch_size: several requests
    grpc = grpc_embed(server.grpc_url, model, SENTENCES)
    assert http.shape == grpc.shape == (len(SENTENCES), 384) and http.dtype == np.float32
    for via, got in (("HTTP", http), ("gRPC", grpc)):
        cos = cosine(got, st_embeddings)
        print(f"\nfp32 ({via}) vs sentence-transformers over {len(SENTENCES)} texts: "
              f"min {cos.min():.6f} mean {cos.mean():.6f}")
        assert cos.min() >= 0.9999, [SENTENCES[i][:40] for i in np.argsort(cos)[:3]]
    np.testing.assert_allclose(np.linalg.norm(http, axis=1), 1.0, rtol=1e-5)   # 2_Normalize is listed
    assert cosine(http, grpc).min() > 0.999999


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8"])
def test_quantized_engines_meet_their_floors_against_sentence_transformers(server, st_embeddings, precision):
    cos = cosine(embed_texts(server.http_url, names(precision).embedding, SENTENCES), st_embeddings)
    floor = PRECISIONS[precision]
    print(f"\n{precision} vs sentence-transformers over {len(SENTENCES)} texts: "
          f"min {cos.min():.6f} mean {cos.mean():.6f}")
    assert cos.min() >= floor.embedding_min_cosine and cos.mean() >= floor.embedding_mean_cosine
    if precision == "fp16":
        assert cos.min() >= 0.9999
    if precision == "int8":
        assert cos.mean() >= 0.999


def test_empty_after_strip_texts_embed_like_sentence_transformers(server, st_embeddings):
    """sentence-transformers embeds "" (and whitespace) as [CLS] [SEP]: so do we, no error."""
    idx = [SENTENCES.index(t) for t in EMPTY_AFTER_STRIP]
    got = embed_texts(server.http_url, names("fp32").embedding, EMPTY_AFTER_STRIP)
    assert cosine(got, st_embeddings[idx]).min() >= 0.9999
    assert cosine(got, got[:1]).min() > 0.99999     # all the same vector


# -- truncation -----------------------------------------------------------------------------------

def test_long_texts_are_truncated_unless_told_not_to(server, st_embeddings):
    import tritonclient.http as httpclient

    long_text = SENTENCES[-1]
    model = names("fp32").embedding
    with httpclient.InferenceServerClient(server.http_url) as c:
        out = c.infer(model, _inputs(httpclient, ["short", long_text], truncate=[True, True])).as_numpy("embedding")
        assert cosine(out[1:], st_embeddings[-1:])[0] >= 0.9999
        with pytest.raises(Exception, match=r"\[400\].*text 1 has \d+ tokens, more than this model's limit of 256"):
            c.infer(model, _inputs(httpclient, ["short", long_text], truncate=[False, False]))
        ok = c.infer(model, _inputs(httpclient, ["short", "also short"], truncate=[False, False]))
        assert ok.as_numpy("embedding").shape == (2, 384)
    assert_healthy(server, "fp32")


# -- bad inputs: a clear 400, and the model stays READY --------------------------------------------

def _bad_request(kind: str, module):
    if kind == "no texts":
        return _inputs(module, []), "got 0"
    if kind == "non-UTF-8":
        return _inputs(module, [b"fine", b"caf\xe9 \xff"]), "text 1 is not valid UTF-8"
    if kind == "wrong dtype":
        t = module.InferInput("text", [2, 1], "INT32")
        t.set_data_from_numpy(np.array([[1], [2]], dtype=np.int32))
        return [t], "expects 'BYTES'"
    if kind == "wrong shape":
        t = module.InferInput("text", [1, 2], "BYTES")
        t.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
        return [t], "unexpected shape for input 'text'"
    if kind == "10,000 texts":
        return _inputs(module, ["a sentence"] * 10_000), f"batch-size must be <= {MAX_BATCH}"
    raise AssertionError(kind)


BAD = ["no texts", "non-UTF-8", "wrong dtype", "wrong shape", "10,000 texts"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_inputs_get_clear_errors(server, kind):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    model = names("int8").embedding
    inputs, match = _bad_request(kind, httpclient)
    with httpclient.InferenceServerClient(server.http_url) as c, pytest.raises(InferenceServerException) as err:
        c.infer(model, inputs)
    assert err.value.status() == "400" and match in err.value.message(), err.value
    assert "Traceback" not in err.value.message()
    inputs, _ = _bad_request(kind, grpcclient)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, inputs)
    finally:
        client.close()
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and match in err.value.message(), err.value
    assert_healthy(server)


# -- dynamic batching ----------------------------------------------------------------------------

@pytest.mark.parametrize("precision,agreement", [("fp32", 0.999999), ("int8", 0.9995)])
def test_concurrent_requests_are_batched_and_give_the_same_embeddings(server, precision, agreement):
    """Texts of concurrent requests run together, and come back as they would alone. fp32 to
    rounding; int8 within 2e-4: OpenVINO quantizes activations dynamically for large batches only."""
    import tritonclient.http as httpclient

    model = names(precision).embedding
    groups = [SENTENCES[i:i + 12] for i in range(0, 240, 12)]
    alone = [embed_texts(server.http_url, model, g) for g in groups]

    def read():
        with httpclient.InferenceServerClient(server.http_url) as c:
            s = c.get_inference_statistics(names(precision).embedding_encoder)["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])

    def stats():
        """Triton counts an execution after its responses are sent: read until two reads agree."""
        last, now, deadline = None, read(), time.monotonic() + 30
        while now != last:
            assert time.monotonic() < deadline, "Triton's statistics did not settle in 30 s"
            time.sleep(0.3)
            last, now = now, read()
        return now

    before = stats()
    local = threading.local()

    def one(texts):  # one connection per thread, many requests in flight
        if not hasattr(local, "c"):
            local.c = httpclient.InferenceServerClient(server.http_url)
        return local.c.infer(model, _inputs(httpclient, texts)).as_numpy("embedding")

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, groups * 3))
    after = stats()
    for i, got in enumerate(together):
        assert cosine(got, alone[i % len(groups)]).min() > agreement
    texts, executions = after[0] - before[0], after[1] - before[1]
    assert texts == 3 * sum(len(g) for g in groups)
    assert executions < 3 * len(groups), "the encoder's dynamic batcher never merged two requests"


# -- a plain transformers checkpoint built with --pooling ------------------------------------------

def test_plain_roberta_checkpoint_with_pooling_flag(server, embedding_repository, tiny_roberta):
    """CLS pooling as --pooling said, no normalization (no 2_Normalize), max length = the 129
    positions RoBERTa can use (130 minus padding_idx + 1), equal to transformers' own output."""
    import torch
    from transformers import RobertaModel

    from backends.contract.manifest import read_manifest
    from backends.embedding import EmbeddingTokenizer

    entry = read_manifest(embedding_repository).deployments[f"{ROBERTA}:fp32"]
    assert entry.engine["pooling"] == ["cls"] and not entry.engine["normalize"]
    assert entry.engine["context_size"] == 129 and entry.engine["dimension"] == 64
    texts = ["hello world", "a longer sentence about nothing in particular " * 3, "", "word " * 300]
    got = embed_texts(server.http_url, DeploymentName(ROBERTA, "fp32").embedding, texts)
    tokenizer = EmbeddingTokenizer.load(embedding_repository / f"{ROBERTA}-tokenize" / "1" / "tokenizer")
    feeds = tokenizer.encode(texts)
    assert set(feeds) == {"input_ids", "attention_mask"} and feeds["input_ids"].shape == (4, 129)
    with torch.no_grad():
        hidden = RobertaModel.from_pretrained(tiny_roberta).eval()(
            **{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    assert cosine(got, hidden[:, 0]).min() > 0.99999
    np.testing.assert_allclose(got, hidden[:, 0], rtol=1e-4, atol=1e-5)
