"""Embeddings: what sentence-transformers does around the encoder, as plain functions.

Tokenize (truncation to the model's max length, dynamic padding to the longest text of a request),
run the encoder over length-sorted chunks, pool (the modes of sentence-transformers' `Pooling`
module) and L2-normalize (its `Normalize` module). The Triton models in backends/models/embedding_*
only convert tensors and call these; the build reads the checkpoint's sentence-transformers files
(builder/build/sources/embedding_config.py) and stores the result beside the models as `embedding.json`.

Every function here is tested against sentence-transformers itself (tests/test_embedding.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from backends.cpu_runtime import RUNTIME_CACHE
from backends.errors import RequestError

CONFIG_NAME = "embedding.json"
# sentence-transformers' Pooling modes, in the order it concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
NORMALIZE_EPS = 1e-12          # torch.nn.functional.normalize's default, which Normalize uses
# Encoder chunks: at most this many texts, and this many tokens (texts x padded length), per call;
# a call costs about as much as this many padded tokens (measured: docs/embeddings.md).
CHUNK_TEXTS = 32
CHUNK_TOKENS = 4096
CHUNK_CALL_COST = 16


# -- configuration (written at build time, read by the Triton models) -----------------------------

@dataclass(frozen=True)
class EmbeddingConfig:
    """How one embedding model turns texts into vectors (everything but the encoder weights)."""

    max_length: int                       # tokens per text, special tokens included
    pooling: tuple[str, ...]              # POOLING_MODES, concatenated in this order
    normalize: bool                       # L2 (sentence-transformers' Normalize module)
    hidden_size: int                      # encoder output width
    do_lower_case: bool = False           # sentence_bert_config.json: lowercase before tokenizing
    encoder_inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    pad_id: int = 0
    pooling_source: str = "1_Pooling/config.json"

    @property
    def dimension(self) -> int:
        return self.hidden_size * len(self.pooling)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "EmbeddingConfig":
        data = json.loads(text)
        for key in ("pooling", "encoder_inputs"):
            data[key] = tuple(data[key])
        return cls(**data)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, directory: Path) -> "EmbeddingConfig":
        return cls.from_json((Path(directory) / CONFIG_NAME).read_text())


# -- requests: texts in ----------------------------------------------------------------------------

def decode_texts(values: Sequence[bytes], max_texts: int | None = None) -> list[str]:
    """UTF-8 texts of one request; refuses none, too many, or invalid bytes (naming the text)."""
    if len(values) == 0:
        raise RequestError("no texts: send at least one string in `text` (shape [n, 1])")
    if max_texts is not None and len(values) > max_texts:
        raise RequestError(f"{len(values)} texts in one request exceed this model's limit of {max_texts}: "
                           f"send at most {max_texts} per request (concurrent requests are batched)")
    texts = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            texts.append(v)
            continue
        try:
            texts.append(bytes(v).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RequestError(f"text {i} is not valid UTF-8 (bad byte at position {e.start}): "
                               "send UTF-8 text") from None
    return texts


def truncate_flags(values: np.ndarray | None, n: int) -> list[bool]:
    """`truncate` per text: absent -> all true; one value -> for every text; else one per text."""
    if values is None:
        return [True] * n
    flat = np.asarray(values).reshape(-1)
    if flat.size == 1:
        return [bool(flat[0])] * n
    if flat.size != n:
        raise RequestError(f"truncate holds {flat.size} values for {n} texts: send one per text, or one in all")
    return [bool(v) for v in flat]


class EmbeddingTokenizer:
    """The model's fast tokenizer with our own truncation and padding (tokenizer.json may carry
    fixed ones: all-MiniLM-L6-v2's pads and truncates to 128)."""

    def __init__(self, tokenizer, config: EmbeddingConfig):
        self.config = config
        self.tokenizer = tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if config.do_lower_case:  # as sentence-transformers does: a Lowercase normalizer in front
            from tokenizers import normalizers

            current = tokenizer.normalizer
            tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([current] if current else []))
        self._truncating = tokenizer.__class__.from_str(tokenizer.to_str())
        self._truncating.enable_truncation(max_length=config.max_length)

    @classmethod
    def load(cls, directory: Path, config: EmbeddingConfig | None = None) -> "EmbeddingTokenizer":
        from tokenizers import Tokenizer

        d = Path(directory)
        return cls(Tokenizer.from_file(str(d / "tokenizer.json")), config or EmbeddingConfig.load(d))

    def encode(self, texts: Sequence[str], truncate: Sequence[bool] | bool = True) -> dict[str, np.ndarray]:
        """Encoder inputs for texts: int64 [n, longest], right-padded. A text longer than
        max_length is truncated where its flag is true and refused where it is false."""
        if isinstance(truncate, bool):
            truncate = [truncate] * len(texts)
        strict = [i for i, t in enumerate(truncate) if not t]
        encodings = self._truncating.encode_batch(list(texts))
        if strict:
            full = self.tokenizer.encode_batch([texts[i] for i in strict])
            for i, e in zip(strict, full):
                if len(e.ids) > self.config.max_length:
                    raise RequestError(
                        f"text {i} has {len(e.ids)} tokens, more than this model's limit of {self.config.max_length}: "
                        "shorten it, or send truncate=true to embed its first tokens only")
        return pad_encodings(encodings, self.config)


def pad_encodings(encodings, config: EmbeddingConfig) -> dict[str, np.ndarray]:
    n = len(encodings)
    longest = max((len(e.ids) for e in encodings), default=0)
    ids = np.full((n, longest), config.pad_id, dtype=np.int64)
    mask = np.zeros((n, longest), dtype=np.int64)
    types = np.zeros((n, longest), dtype=np.int64)
    for row, e in enumerate(encodings):
        k = len(e.ids)
        ids[row, :k] = e.ids
        mask[row, :k] = 1
        types[row, :k] = e.type_ids
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: arrays[name] for name in config.encoder_inputs}


# -- the encoder: length-sorted chunks over every text of a dynamic batch --------------------------

def plan_chunks(lengths: Sequence[int], max_texts: int = CHUNK_TEXTS, max_tokens: int = CHUNK_TOKENS,
                call_cost: int = CHUNK_CALL_COST) -> list[list[int]]:
    """Group row indices into encoder calls with the least padded work: rows sorted by length,
    then cut where a cut saves more padding than a call costs (`call_cost`, in tokens), with at
    most max_texts rows and max_tokens padded tokens per call (bounded memory, whatever the batch).
    Exact dynamic programming over the sorted rows: O(n * max_texts)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    padded = [max(lengths[i], 1) for i in order]
    best = [0] + [None] * len(order)     # best[j]: least cost of the first j sorted rows
    start = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j, 0, -1):        # last call = sorted rows i-1 .. j-1, padded to padded[j-1]
            rows = j - i + 1
            if rows > 1 and (rows > max_texts or rows * padded[j - 1] > max_tokens):
                break
            cost = best[i - 1] + rows * padded[j - 1] + call_cost
            if best[j] is None or cost < best[j]:
                best[j], start[j] = cost, i
    chunks = []
    j = len(order)
    while j > 0:
        chunks.append(order[start[j] - 1:j])
        j = start[j] - 1
    return chunks[::-1]


def check_encoder_inputs(feeds: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    """The encoder inputs of one request: every tensor present, int64 [texts, tokens] of one shape,
    attention_mask right-padded (1s, then 0s)."""
    missing = [name for name, v in feeds.items() if v is None]
    if missing:
        raise RequestError(f"missing encoder input {', '.join(missing)}: send {', '.join(feeds)}")
    mask = np.asarray(feeds["attention_mask"])
    if mask.ndim != 2 or any(np.shape(v) != mask.shape for v in feeds.values()):
        shapes = ", ".join(f"{n} {list(np.shape(v))}" for n, v in feeds.items())
        raise RequestError(f"encoder inputs must share one [texts, tokens] shape, got {shapes}")
    if mask.shape[0] == 0:
        raise RequestError("no texts: send at least one")
    lengths = mask.sum(axis=1)
    if not (mask == (np.arange(mask.shape[1])[None, :] < lengths[:, None])).all():
        raise RequestError("attention_mask must be right-padded: 1 for every token, then 0 for padding")
    return {name: np.asarray(v, dtype=np.int64) for name, v in feeds.items()}


def encode_batches(batches: Sequence[dict[str, np.ndarray]], infer: Callable[[dict[str, np.ndarray]], np.ndarray],
                   max_texts: int = CHUNK_TEXTS, max_tokens: int = CHUNK_TOKENS) -> list[np.ndarray]:
    """Token embeddings for several requests' encoder inputs ([n_i, L_i] each), computed together.

    Rows of every request are cut to their real length, sorted, run through `infer` in chunks
    (see plan_chunks) and put back: request i gets float32 [n_i, L_i, hidden], zeros at padding.
    `infer` maps {input name: int64 [rows, length]} to float32 [rows, length, hidden].
    """
    rows = []   # (batch index, row index, length)
    for b, feeds in enumerate(batches):
        mask = np.asarray(feeds["attention_mask"])
        if mask.ndim != 2:
            raise RequestError(f"attention_mask must be [texts, tokens], got shape {list(mask.shape)}")
        for r, length in enumerate(mask.sum(axis=1).tolist()):
            rows.append((b, r, int(length)))
    outputs: list[np.ndarray | None] = [None] * len(batches)
    for chunk in plan_chunks([length for _, _, length in rows], max_texts, max_tokens):
        longest = max(max(rows[i][2] for i in chunk), 1)
        feeds = {}
        for name in batches[0]:
            arr = np.zeros((len(chunk), longest), dtype=np.int64)
            for k, i in enumerate(chunk):
                b, r, length = rows[i]
                arr[k, :length] = batches[b][name][r, :length]
            feeds[name] = arr
        hidden = np.asarray(infer(feeds))
        for k, i in enumerate(chunk):
            b, r, length = rows[i]
            if outputs[b] is None:
                shape = batches[b]["attention_mask"].shape
                outputs[b] = np.zeros((shape[0], shape[1], hidden.shape[-1]), dtype=np.float32)
            outputs[b][r, :length] = hidden[k, :length]
    return [o if o is not None else np.zeros((0, 0, 0), dtype=np.float32) for o in outputs]


# The encoder as the CPU plugin compiled it at build time (CompiledModel.export_model), beside the IR,
# and what it was compiled for. Importing it skips the plugin's graph transformations: 0.17 s -> 0.08 s
# for all-minilm-l6-v2 int8 at load (issue 16). Imported only when the key matches
# this host and this OpenVINO; otherwise, or when the import fails, the IR is compiled as before.
COMPILED_BLOB = "openvino_model.cpu.blob"
COMPILED_KEY = "openvino_model.cpu.json"
WEIGHTS_EXPANDED = "weights_expanded"     # in the key file: the blob's weights were expanded to f32


def encoder_properties(inference_precision: str) -> dict[str, str]:
    return {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY", **RUNTIME_CACHE}


def compiled_key(xml: Path, inference_precision: str) -> dict:
    """What a compiled encoder depends on: OpenVINO's version, the host's ISA class, the compile
    properties and the IR (its graph's hash, its weights' size). Whether its weights were expanded
    at load follows from these (backends.encoder_weights), so a blob is only reused where the same
    decision would be made."""
    import hashlib

    import openvino as ov

    from backends.cpu_isa import host_isa_class

    xml = Path(xml)
    return {"openvino": ov.__version__, "isa_class": host_isa_class(),
            "properties": encoder_properties(inference_precision),
            "xml_sha256": hashlib.sha256(xml.read_bytes()).hexdigest(),
            "bin_bytes": xml.with_suffix(".bin").stat().st_size}


def export_compiled(xml: Path, inference_precision: str) -> Path:
    """Compile the encoder as serving will and write the compiled blob and its key beside the IR."""
    import openvino as ov

    xml = Path(xml)
    compiled, expand = compile_encoder(ov.Core(), xml, inference_precision)
    blob = xml.parent / COMPILED_BLOB
    blob.write_bytes(compiled.export_model().getvalue())
    key = {**compiled_key(xml, inference_precision), WEIGHTS_EXPANDED: expand}
    (xml.parent / COMPILED_KEY).write_text(json.dumps(key, indent=1) + "\n")
    return blob


def compile_encoder(core, xml: Path, inference_precision: str):
    """The IR compiled for this host's CPU, its compressed weights expanded to f32 first where no
    kernel here computes on them (backends.encoder_weights). Returns (compiled model, expanded?)."""
    from backends.cpu_isa import host_isa_class
    from backends.encoder_weights import expand_at_load, expanded

    model = core.read_model(str(xml))
    expand = expand_at_load(model, inference_precision, host_isa_class())
    if expand:
        model = expanded(model)
    return core.compile_model(model, "CPU", encoder_properties(inference_precision)), expand


class OpenVinoEncoder:
    """An OpenVINO encoder IR compiled for CPU, called as `infer(feeds) -> token embeddings`.
    `weights_expanded`: whether its compressed weights were expanded to f32 at load (for an
    imported blob: what the build's compile on a host of this class decided)."""

    def __init__(self, xml: Path, inference_precision: str = "f32", use_compiled: bool = True):
        import openvino as ov

        core = ov.Core()
        # the imported blob's mapping lives as long as the compiled model: the plugin keeps
        # pointing into it (constants are not copied out of a shared tensor)
        self.compiled, self.weights_expanded, self._blob = (self._import(core, Path(xml), inference_precision)
                                                            if use_compiled else (None, None, None))
        self.imported = self.compiled is not None
        if self.compiled is None:
            self.compiled, self.weights_expanded = compile_encoder(core, Path(xml), inference_precision)
        self.request = self.compiled.create_infer_request()
        self.inputs = tuple(i.get_any_name() for i in self.compiled.inputs)

    @staticmethod
    def _import(core, xml: Path, inference_precision: str):
        """(the build's compiled encoder, whether its weights were expanded, the blob's mapping) when it
        was made for this host, OpenVINO and IR; else (None, None, None). A blob from before the
        expansion rule (no `weights_expanded` in its key) is not imported: it may hold weights this
        host would expand.

        The blob is imported from a memory map, not from bytes read into Python: the plugin takes
        its constants from the mapped pages instead of copying them (all-minilm-l6-v2 int8 on an
        AVX2 host, whose blob holds f32 weights: import 0.22 -> 0.12 s, 30 MiB less resident). The
        map is private (copy-on-write), so nothing can write through it into the file; files in a
        repository are replaced, never rewritten in place, so the mapped file does not change under it."""
        import openvino as ov

        blob, key = xml.parent / COMPILED_BLOB, xml.parent / COMPILED_KEY
        try:
            if not (blob.is_file() and key.is_file()):
                return None, None, None
            recorded = json.loads(key.read_text())
            expanded = recorded.pop(WEIGHTS_EXPANDED)   # what the compile decided, not what it depends on
            if recorded != compiled_key(xml, inference_precision) or not isinstance(expanded, bool):
                return None, None, None
            mapped = ov.Tensor(np.memmap(blob, dtype=np.uint8, mode="c"), shared_memory=True)
            return core.import_model(mapped, "CPU", encoder_properties(inference_precision)), expanded, mapped
        except Exception:  # noqa: BLE001 -- an old key or a blob the plugin refuses: compile the IR instead
            return None, None, None

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        self.request.infer({name: feeds[name] for name in self.inputs})
        return self.request.get_output_tensor(0).data.copy()


# -- pooling and normalization ---------------------------------------------------------------------

def pool(token_embeddings: np.ndarray, attention_mask: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """sentence-transformers' Pooling over right-padded [n, L, H] (modes concatenated in order)."""
    te = np.asarray(token_embeddings, dtype=np.float32)
    mask = np.asarray(attention_mask)
    if te.ndim != 3 or mask.shape != te.shape[:2]:
        raise RequestError(f"token embeddings {list(te.shape)} and attention mask {list(mask.shape)} do not match")
    n, length, _ = te.shape
    m = mask.astype(np.float32)[..., None]
    out = []
    counts = None
    for mode in modes:
        if mode == "cls":
            first = mask.astype(np.int32).argmax(axis=1) if length else np.zeros(n, dtype=np.int64)
            out.append(te[np.arange(n), first])
        elif mode == "max":
            out.append(np.where(m > 0, te, -np.inf).max(axis=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if counts is None:
                sums = (te * m).sum(axis=1)
                counts = np.clip(m.sum(axis=1), 1e-9, None)
            out.append(sums / (counts if mode == "mean" else np.sqrt(counts)))
        elif mode == "weightedmean":
            weights = np.arange(1, length + 1, dtype=np.float32)[None, :, None] * m
            out.append((te * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None))
        elif mode == "lasttoken":
            flipped = mask[:, ::-1]
            values, indices = flipped.max(axis=1), flipped.argmax(axis=1)
            indices = np.where(values == 0, length - 1, indices)
            out.append((te * m)[np.arange(n), length - indices - 1])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return np.concatenate(out, axis=-1).astype(np.float32)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """torch.nn.functional.normalize(x, p=2, dim=-1), as sentence-transformers' Normalize."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, NORMALIZE_EPS)).astype(np.float32)


def sentence_embeddings(token_embeddings: np.ndarray, attention_mask: np.ndarray,
                        config: EmbeddingConfig) -> np.ndarray:
    pooled = pool(token_embeddings, attention_mask, config.pooling)
    return l2_normalize(pooled) if config.normalize else pooled


def embed(texts: Sequence[str], tokenizer: EmbeddingTokenizer, infer: Callable, batch: int = 32) -> np.ndarray:
    """The whole pipeline in one process (the build's accuracy check): texts -> [n, dimension]."""
    out = []
    for i in range(0, len(texts), batch):
        feeds = tokenizer.encode(texts[i:i + batch])
        (token_embeddings,) = encode_batches([feeds], infer)
        out.append(sentence_embeddings(token_embeddings, feeds["attention_mask"], tokenizer.config))
    return np.concatenate(out) if out else np.zeros((0, tokenizer.config.dimension), dtype=np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, d] arrays."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
