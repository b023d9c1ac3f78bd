"""Write Triton model folders from the templates in model_repository/.

Configs are rendered with jinja2 StrictUndefined (a missing value fails the build, nothing like
`${...}` is ever left behind); Python-backend roles get their thin `1/model.py` copied beside.
Every writer starts from an empty model folder, so a rebuilt model never keeps stale files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jinja2

import model_repository
from backends import contract as c
from backends.tokenization import TOKENIZER_FILES
from builder.errors import BuildError
from builder.naming import DeploymentName

TEMPLATES = Path(model_repository.__file__).resolve().parent
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=True, autoescape=False)


def render_config(role: str, **context) -> str:
    text = _env.get_template(f"{role}/config.pbtxt.j2").render(**context)
    if "${" in text:
        raise BuildError(f"the {role} config still holds a ${{...}} placeholder: fix its template")
    return text


def fresh_model_dir(repo: Path, name: str) -> Path:
    """An empty `<repo>/<name>/1/` (removing the old folder: files may be hard links)."""
    model_dir = Path(repo) / name
    shutil.rmtree(model_dir, ignore_errors=True)
    (model_dir / "1").mkdir(parents=True)
    return model_dir


def write_model(repo: Path, role: str, name: str, with_code: bool = True, **context) -> Path:
    model_dir = fresh_model_dir(repo, name)
    (model_dir / "config.pbtxt").write_text(render_config(role, name=name, **context))
    if with_code:
        shutil.copy2(TEMPLATES / role / "1" / "model.py", model_dir / "1" / "model.py")
    return model_dir


def copy_tokenizer(hf_dir: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(hf_dir) / name).exists():
            shutil.copyfile(Path(hf_dir) / name, target / name)


def write_llm_shared(repo: Path, dep: DeploymentName, hf_dir: Path, context_size: int, max_batch_size: int) -> list[str]:
    """Preprocessing and postprocessing: precision-independent, one pair per model name."""
    common = {"deployment": dep.name, "max_batch_size": max_batch_size}
    pre = write_model(repo, "llm_preprocessing", dep.preprocessing, inputs=c.PREPROCESSING_INPUTS,
                      outputs=c.PREPROCESSING_OUTPUTS, context_size=context_size, **common)
    post = write_model(repo, "llm_postprocessing", dep.postprocessing, inputs=c.POSTPROCESSING_INPUTS,
                       outputs=c.POSTPROCESSING_OUTPUTS, **common)
    for d in (pre, post):
        copy_tokenizer(hf_dir, d / "1" / "tokenizer")
    return [dep.preprocessing, dep.postprocessing]


def write_llm_cpu_engine(repo: Path, dep: DeploymentName, engine_dir: Path, context_size: int,
                         max_batch_size: int) -> str:
    """The CPU engine model; the engine files move into its `1/engine/`."""
    model_dir = write_model(repo, "llm_engine", dep.llm_engine, deployment=str(dep), inputs=c.ENGINE_INPUTS,
                            outputs=c.ENGINE_OUTPUTS, context_size=context_size,
                            max_batch_size=max_batch_size, precision=dep.precision)
    shutil.move(str(engine_dir), str(model_dir / "1" / "engine"))
    return dep.llm_engine


def write_llm_front(repo: Path, dep: DeploymentName, hf_dir: Path, max_batch_size: int) -> list[str]:
    """The engine call, the ensemble over it, and the streaming model."""
    engine_inputs = [t for t in c.ENGINE_INPUTS if t.name != "stop"]
    write_model(repo, "llm_engine_call", dep.llm_engine_call, deployment=str(dep), max_batch_size=max_batch_size,
                inputs=engine_inputs, outputs=c.ENGINE_OUTPUTS, engine_model=dep.llm_engine)
    roles = {"preprocessing": dep.preprocessing, "engine_call": dep.llm_engine_call,
             "postprocessing": dep.postprocessing}
    steps = [{"model": roles[role], "inputs": ins, "outputs": outs} for role, ins, outs in c.ENSEMBLE_STEPS]
    common = {"deployment": str(dep), "max_batch_size": max_batch_size, "inputs": c.ENSEMBLE_INPUTS,
              "outputs": c.ENSEMBLE_OUTPUTS}
    write_model(repo, "llm", dep.llm, with_code=False, steps=steps, stream_model=dep.llm_stream, **common)
    stream = write_model(repo, "llm_stream", dep.llm_stream, preprocessing_model=dep.preprocessing,
                         engine_model=dep.llm_engine, **common)
    copy_tokenizer(hf_dir, stream / "1" / "tokenizer")
    return [dep.llm_engine_call, dep.llm, dep.llm_stream]


def write_embedding_models(repo: Path, dep: DeploymentName, hf_dir: Path, config, engine_dir: Path,
                           max_batch_size: int, compute: str) -> list[str]:
    """The CPU encoder (its OpenVINO files move into `1/engine/`) and the pipeline around it.
    `config` is a backends.embedding.EmbeddingConfig."""
    from backends import embedding as emb
    from builder.precisions import PRECISIONS

    io = emb.contract(config)
    encoder = write_model(repo, "embedding_encoder", dep.embedding_encoder, inputs=io["encoder"][0],
                          outputs=io["encoder"][1], quantization=PRECISIONS[dep.precision].openvino,
                          compute=compute, chunk_texts=emb.CHUNK_TEXTS, chunk_tokens=emb.CHUNK_TOKENS,
                          deployment=str(dep), max_batch_size=max_batch_size)
    shutil.move(str(engine_dir), str(encoder / "1" / "engine"))
    return write_embedding_pipeline(repo, dep, hf_dir, config, max_batch_size, emb.TOKEN_EMBEDDINGS)


def write_embedding_pipeline(repo: Path, dep: DeploymentName, hf_dir: Path, config, max_batch_size: int,
                             encoder_output: str) -> list[str]:
    """Tokenize and pooling (shared by every precision of one name) and the ensemble users call,
    around the encoder model `dep.embedding_encoder` (CPU or TensorRT, already written) whose token
    embeddings come out as `encoder_output` (`last_hidden_state` for a plain transformers export)."""
    from backends import embedding as emb

    io = emb.contract(config)
    shared = {"deployment": dep.name, "max_batch_size": max_batch_size}   # identical for every precision
    tokenize = write_model(repo, "embedding_tokenize", dep.embedding_tokenize, inputs=io["tokenize"][0],
                           outputs=io["tokenize"][1], max_length=config.max_length, **shared)
    (tokenize / "1" / "tokenizer").mkdir()
    shutil.copyfile(Path(hf_dir) / "tokenizer.json", tokenize / "1" / "tokenizer" / "tokenizer.json")
    config.save(tokenize / "1" / "tokenizer")
    pooling = write_model(repo, "embedding_pooling", dep.embedding_pooling, inputs=io["pooling"][0],
                          outputs=io["pooling"][1], pooling=" + ".join(config.pooling), normalize=config.normalize,
                          pooling_source=config.pooling_source, **shared)
    config.save(pooling / "1")
    names = {"tokenize": dep.embedding_tokenize, "encoder": dep.embedding_encoder, "pooling": dep.embedding_pooling}
    token_names = [t.name for t in io["tokenize"][1]]
    steps = [
        {"model": names["tokenize"], "inputs": {emb.TEXT: emb.TEXT, emb.TRUNCATE: emb.TRUNCATE},
         "outputs": {n: n for n in token_names}},
        {"model": names["encoder"], "inputs": {n: n for n in token_names},
         "outputs": {encoder_output: emb.TOKEN_EMBEDDINGS}},
        {"model": names["pooling"], "inputs": {emb.TOKEN_EMBEDDINGS: emb.TOKEN_EMBEDDINGS,
                                               "attention_mask": "attention_mask"},
         "outputs": {emb.EMBEDDING: emb.EMBEDDING}},
    ]
    write_model(repo, "embedding", dep.embedding, with_code=False, inputs=io["ensemble"][0],
                outputs=io["ensemble"][1], steps=steps, dimension=config.dimension, deployment=str(dep),
                max_batch_size=max_batch_size)
    return dep.embedding_models()
