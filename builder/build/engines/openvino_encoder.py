"""CPU embedding engines on OpenVINO: one fp32 encoder export per checkpoint, one engine per precision.

The fp32 IR (optimum-intel's `feature-extraction` export of the transformer: token embeddings out)
is the reference; fp16 / int8 / fp8 are derived from it exactly as for LLMs
(builder.build.engines.openvino_common.derive: compress_to_fp16, nncf INT8_ASYM, nncf FP8_E4M3). Pooling and
normalization are not part of the engine: the Triton pooling model applies what the checkpoint's
sentence-transformers files say (backends/embedding.py), and so does the accuracy check here, which
compares pooled, normalized embeddings of a fixed set of sentences with the fp32 reference's.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from backends import embedding as emb
from backends.contract.precisions import PRECISIONS
from builder.build.deployment import DeploymentSpec
from builder.build.engine_target import BuildJob, BuiltDeployment
from builder.build.engines import openvino_common as ov_common
from builder.build.engines import openvino_memory
from builder.build.sources.checkpoint import Checkpoint
from builder.build.sources.embedding_config import read_checkpoint_config

# Inference precision per engine (INFERENCE_PRECISION_HINT). f32 keeps fp32 equal to
# sentence-transformers and fp16 within 1e-6 of it. fp8 weights run at bf16: 1.8x faster on this CPU
# with the same cosine (to 2e-5); int8 is no faster at bf16, so stays f32. A CPU without native bf16
# computes at f32. Measurements: docs/embeddings.md.
COMPUTE = {"fp32": "f32", "fp16": "f32", "int8": "f32", "fp8": "bf16"}
# int8 weights in groups of this many input channels, and activations quantized on the fly in
# groups of as many (builder/engines/openvino_grouped_int8.py): ~10% faster than per-channel
# weights with OpenVINO's default groups of 32, at the same accuracy.
INT8_GROUP_SIZE = 64

# The accuracy check's fixed sentences, mixed like real embedding traffic: mostly prose and
# questions, then other scripts, emoji, code and numbers, a few very short texts, two texts beyond
# any max length (truncated) and whitespace only (sentence-transformers embeds it as [CLS] [SEP]).
_PROSE = (
    "A man is playing a guitar on the street corner.",
    "The new movie is awesome, and the soundtrack is even better.",
    "Quarterly revenue rose 12.5% to $4.3 billion, beating analyst estimates.",
    "The mitochondria is the powerhouse of the cell.",
    "Paris is the capital and most populous city of France.",
    "Water boils at 100 °C at sea level; at altitude it boils at a lower temperature.",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong became the first person to walk on it.",
    "Please find attached the invoice for March; payment is due within 30 days.",
    "The patient reported mild headaches and dizziness after starting the new medication.",
    "Neural networks learn representations by adjusting weights with gradient descent.",
    "The bakery on the corner sells fresh croissants every morning before seven.",
    "Heavy rain flooded several streets in the old town overnight.",
    "She finished the marathon in just under four hours despite the heat.",
    "The committee postponed its decision on the new stadium until next spring.",
    "Our flight was delayed because of a technical problem with the landing gear.",
    "The museum's new exhibition explores the history of early photography.",
    "A small earthquake shook the coastal region, but no damage was reported.",
    "He forgot his umbrella on the train and had to walk home in the rain.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Electric cars are becoming cheaper as battery prices continue to fall.",
    "The children built a sandcastle and watched the tide wash it away.",
    "The company announced that it will open a new office in Singapore.",
    "Scientists discovered a new species of frog in the rainforest of Ecuador.",
    "The library extended its opening hours during the exam period.",
    "My grandmother still writes letters by hand to all her friends.",
    "The software update fixes a bug that drained the battery overnight.",
    "The orchestra rehearsed the symphony for weeks before the premiere.",
    "Traffic on the motorway was backed up for ten kilometres after the accident.",
    "The hotel room had a beautiful view of the mountains and the lake.",
    "Regular exercise and enough sleep are good for both body and mind.",
    "How do I reset my password if I no longer have access to my email?",
    "What is the difference between a virus and a bacterium?",
    "Can you recommend a good book about the history of Rome?",
    "Why is the sky blue during the day and red at sunset?",
    "Where can I find the train timetable for the weekend?",
    "Is it safe to drink tap water in this city?",
)
_OTHER = (
    "Le chat dort sur le canapé depuis ce matin.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "¿Dónde está la estación de tren más cercana?",
    "Мы пошли гулять в парк, несмотря на дождь.",
    "今日はとても良い天気ですね。散歩に行きましょう。",
    "我喜欢在周末读书和喝茶。",
    "الطقس جميل اليوم في المدينة.",
    "मुझे हिंदी में किताबें पढ़ना पसंद है।",
    "Η θάλασσα ήταν ήρεμη το πρωί.",
    "서울은 한국의 수도입니다.",
    "I love this! 😍🔥🎉",
    "🚀🌕👩‍🚀 to the moon",
    "Great job, team 👏👏",
    "def add(a, b):\n    return a + b",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "Call me at +1 (555) 010-9999 or mail hello@example.com.",
    "https://example.com/path?query=1&lang=en#section",
    "ok",
    "Thanks!",
    "Yes.",
)
ACCURACY_SENTENCES = _PROSE + _OTHER + (
    " ".join(_PROSE) * 2,                    # far beyond 512 tokens: truncated
    " ".join(_OTHER[:10]) * 3,
    "   \n\t ",
)

_reference_embeddings: dict[tuple[str, str], np.ndarray] = {}


def export_reference(hf_dir: Path, out_dir: Path, log_path: Path) -> Path:
    """`--library transformers` for every checkpoint: the IR outputs token embeddings only, and
    pooling stays ours whatever the checkpoint's sentence-transformers modules are."""
    return ov_common.export_fp32(hf_dir, out_dir, log_path, ["--library", "transformers", "--task",
                                                             "feature-extraction", "--disable-convert-tokenizer"])


def reference_ir(ckpt: Checkpoint, cache_dir: Path, step) -> Path:
    """The fp32 encoder export of a checkpoint, made once and kept in the cache."""
    return ov_common.cached_export(ckpt, cache_dir, "encoder-fp32", step,
                                   "exporting the fp32 encoder with optimum-intel (about 30 s for 22M parameters)",
                                   export_reference)


def encoder_inputs(engine_dir: Path) -> tuple[str, ...]:
    import openvino as ov

    model = ov.Core().read_model(Path(engine_dir) / ov_common.MODEL_XML)
    return tuple(i.get_any_name() for i in model.inputs)


def embeddings_of(engine_dir: Path, tokenizer: emb.EmbeddingTokenizer, compute: str,
                  sentences=ACCURACY_SENTENCES) -> np.ndarray:
    """Pooled (and normalized, if the model says so) embeddings of `sentences` from one engine."""
    encoder = emb.OpenVinoEncoder(Path(engine_dir) / ov_common.MODEL_XML, compute)
    return emb.embed(list(sentences), tokenizer, encoder)


def check_floor(precision: str, figures: dict[str, float]) -> dict[str, float]:
    """The floor this precision must meet; raises BuildError (engine not published) below it."""
    p = PRECISIONS[precision]
    return ov_common.enforce_floor("encoder", precision, figures,
                                   {"min_cosine": p.embedding_min_cosine, "mean_cosine": p.embedding_mean_cosine})


def measure_accuracy(reference: Path, engine_dir: Path, tokenizer: emb.EmbeddingTokenizer, precision: str) -> dict:
    key = (str(reference), tokenizer.config.to_json())
    if key not in _reference_embeddings:
        _reference_embeddings[key] = embeddings_of(reference, tokenizer, COMPUTE["fp32"])
    cos = emb.cosine(_reference_embeddings[key], embeddings_of(engine_dir, tokenizer, COMPUTE[precision]))
    figures = {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6)}
    floor = check_floor(precision, figures)
    return {"reference": "fp32", "method": "cosine of pooled embeddings of fixed sentences",
            "sentences": len(ACCURACY_SENTENCES), **figures, "floor": floor}


def write_compiled(engine_dir: Path, tokenizer: emb.EmbeddingTokenizer, compute: str) -> bool:
    """The encoder compiled for this host beside its IR (backends.embedding.COMPILED_BLOB), kept only
    when the imported blob gives the same token embeddings as a fresh compile, bit for bit."""
    xml = Path(engine_dir) / ov_common.MODEL_XML
    emb.export_compiled(xml, compute)
    feeds = tokenizer.encode(list(ACCURACY_SENTENCES[:8]))
    imported = emb.OpenVinoEncoder(xml, compute)
    if imported.imported and np.array_equal(imported(feeds), emb.OpenVinoEncoder(xml, compute, use_compiled=False)(feeds)):
        return True
    for name in (emb.COMPILED_BLOB, emb.COMPILED_KEY):
        (Path(engine_dir) / name).unlink(missing_ok=True)
    return False


def engine_info(precision: str, config: emb.EmbeddingConfig, max_batch_size: int, engine_dir: Path,
                memory: dict | None = None) -> dict:
    """`memory`: the encoder's measured RSS (openvino_memory); memory_bytes adds the tokenize model's
    stub (estimated). Without it memory_bytes is an estimate from the weights."""
    import openvino as ov

    weights = sum(f.stat().st_size for f in Path(engine_dir).glob("*.bin"))
    return {
        "target": "cpu",
        "format": "openvino-ir",
        "version": f"openvino {ov.__version__.split('-')[0]}",
        "quantization": ov_common.quantization_of(precision, INT8_GROUP_SIZE),
        "compute": COMPUTE[precision],
        "context_size": config.max_length,
        "max_batch_size": max_batch_size,
        "dimension": config.dimension,
        "pooling": list(config.pooling),
        "normalize": config.normalize,
        "weights_bytes": weights,
        **({"memory_bytes": memory["after_load_test_bytes"] + ov_common.PYTHON_MODEL_BYTES, "memory": memory}
           if memory is not None else
           {"memory_bytes": ov_common.memory_estimate(engine_dir, 2)}),   # tokenize, encoder (pools)
    }


def build_deployment(job: BuildJob) -> BuiltDeployment:
    """One embedding deployment `<name>:<precision>` into the staging repository.

    `job.context_size` (the model's position limit, or --context-size) bounds the max length; without
    --context-size the max length is the checkpoint's own (sentence_bert_config.json max_seq_length).
    """
    dep, spec, ckpt, precision = job.dep, job.spec, job.ckpt, job.precision
    config = read_checkpoint_config(ckpt.hf_dir, ckpt.config, spec.pooling, spec.context_size, ckpt.origin)
    config = dataclasses.replace(config, max_length=min(config.max_length, job.context_size))
    reference = reference_ir(ckpt, job.cache_dir, job.step)
    config = dataclasses.replace(config, encoder_inputs=encoder_inputs(reference))
    work = job.staging / ".work" / dep.embedding_encoder
    shutil.rmtree(work, ignore_errors=True)
    with job.step(f"deriving the {precision} encoder ({ov_common.quantization_of(precision, INT8_GROUP_SIZE)})"):
        ov_common.derive(reference, precision, work, INT8_GROUP_SIZE)
    tokenizer = emb.EmbeddingTokenizer(Tokenizer.from_file(str(Path(ckpt.hf_dir) / "tokenizer.json")), config)
    with job.step("measuring accuracy against fp32"):
        accuracy = measure_accuracy(reference, work, tokenizer, precision)
    with job.step("compiling the encoder for this host (loads import it instead of compiling)"):
        write_compiled(work, tokenizer, COMPUTE[precision])
    memory = None   # without the load test, engine_info estimates it from the weights
    if spec.memory_test:
        with job.step(f"measuring the encoder's memory ({spec.max_batch_size} texts of {config.max_length} tokens)"):
            memory = openvino_memory.measure_encoder(work, COMPUTE[precision], spec.max_batch_size, config)
    info = engine_info(precision, config, spec.max_batch_size, work, memory)
    models = job.writer.write_embedding_models(dep, ckpt.hf_dir, config, work, spec.max_batch_size, COMPUTE[precision])
    return BuiltDeployment(models, {"infer": dep.embedding}, info, accuracy)


def format_plan(spec: DeploymentSpec, ckpt: Checkpoint, context_size: int, output: Path, cache_dir: Path) -> str:
    config = read_checkpoint_config(ckpt.hf_dir, ckpt.config, spec.pooling, spec.context_size, ckpt.origin)
    p = PRECISIONS
    return ov_common.cpu_plan(
        spec, ckpt, cache_dir, "--library transformers --task feature-extraction --disable-convert-tokenizer",
        "encoder-fp32", f"max length {min(config.max_length, context_size)}, pooling {config.pooling}",
        lambda q: f"cosine min >= {p[q].embedding_min_cosine}, mean >= {p[q].embedding_mean_cosine}")
