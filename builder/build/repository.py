"""The one repository writer: Triton model folders from the templates in model_repository/.

Configs are rendered with jinja2 StrictUndefined (a missing value fails the build, nothing like
`${...}` is ever left behind). A Python-backend model gets a `1/model.py` that only points at the
runtime copied into the repository (builder/build/runtime.py) and imports its role's model class
from there (backends/models/<role>.py). Every writer starts from an empty model folder, so a
rebuilt model never keeps stale files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import model_repository
from backends.contract import tensors as c
from backends.contract.manifest import RuntimeInfo
from backends.contract.naming import DeploymentName
from backends.contract.precisions import PRECISIONS
from backends.embedding import CHUNK_TEXTS, CHUNK_TOKENS, EmbeddingConfig
from backends.errors import BuildError
from backends.tokenization import TOKENIZER_FILES
from builder.templating import strict_environment

TEMPLATES = Path(model_repository.__file__).resolve().parent
MODELS_PACKAGE = Path(c.__file__).resolve().parents[1] / "models"   # backends/models: one module per role


_env = strict_environment(TEMPLATES)


def render(template: str, **context) -> str:
    text = _env.get_template(template).render(**context)
    if "${" in text:
        raise BuildError(f"{template} still holds a ${{...}} placeholder: fix the template")
    return text


def render_config(role: str, **context) -> str:
    return render(f"{role}/config.pbtxt.j2", **context)


def is_python_role(role: str) -> bool:
    return (MODELS_PACKAGE / f"{role}.py").is_file()


@dataclass(frozen=True)
class RepositoryWriter:
    """Writes model folders into `root`, pointing every Python model at `runtime`."""

    root: Path
    runtime: RuntimeInfo

    def fresh_model_dir(self, name: str) -> Path:
        """An empty `<root>/<name>/1/` (removing the old folder: files may be hard links)."""
        model_dir = Path(self.root) / name
        shutil.rmtree(model_dir, ignore_errors=True)
        (model_dir / "1").mkdir(parents=True)
        return model_dir

    def write_model(self, role: str, name: str, **context) -> Path:
        model_dir = self.fresh_model_dir(name)
        (model_dir / "config.pbtxt").write_text(render_config(role, name=name, **context))
        if is_python_role(role):
            (model_dir / "1" / "model.py").write_text(render(
                "model.py.j2", name=name, role=role, runtime_path=self.runtime.path, built_by=self.runtime.built_by))
        return model_dir

    def copy_tokenizer(self, hf_dir: Path, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (Path(hf_dir) / name).exists():
                shutil.copyfile(Path(hf_dir) / name, target / name)

    # -- LLM deployments ----------------------------------------------------------------------
    def write_llm_shared(self, dep: DeploymentName, hf_dir: Path, context_size: int, max_batch_size: int) -> list[str]:
        """Preprocessing and postprocessing: precision-independent, one pair per model name."""
        common = {"deployment": dep.name, "max_batch_size": max_batch_size}
        pre = self.write_model("llm_preprocessing", dep.preprocessing, inputs=c.PREPROCESSING_INPUTS,
                               outputs=c.PREPROCESSING_OUTPUTS, context_size=context_size, **common)
        post = self.write_model("llm_postprocessing", dep.postprocessing, inputs=c.POSTPROCESSING_INPUTS,
                                outputs=c.POSTPROCESSING_OUTPUTS, **common)
        for d in (pre, post):
            self.copy_tokenizer(hf_dir, d / "1" / "tokenizer")
        return [dep.preprocessing, dep.postprocessing]

    def write_llm_cpu_engine(self, dep: DeploymentName, engine_dir: Path, context_size: int,
                             max_batch_size: int, prompt_lookup: bool = False) -> str:
        """The CPU engine model; the engine files move into its `1/engine/`."""
        model_dir = self.write_model("llm_engine", dep.llm_engine, deployment=str(dep), inputs=c.ENGINE_INPUTS,
                                     outputs=c.ENGINE_OUTPUTS, context_size=context_size,
                                     max_batch_size=max_batch_size, precision=dep.precision,
                                     prompt_lookup=prompt_lookup)
        shutil.move(str(engine_dir), str(model_dir / "1" / "engine"))
        return dep.llm_engine

    def write_llm_front(self, dep: DeploymentName, hf_dir: Path, max_batch_size: int) -> list[str]:
        """The engine call, the ensemble over it, and the streaming model."""
        engine_inputs = [t for t in c.ENGINE_INPUTS if t.name != "stop"]
        self.write_model("llm_engine_call", dep.llm_engine_call, deployment=str(dep), max_batch_size=max_batch_size,
                         inputs=engine_inputs, outputs=c.ENGINE_OUTPUTS, engine_model=dep.llm_engine)
        roles = {"preprocessing": dep.preprocessing, "engine_call": dep.llm_engine_call,
                 "postprocessing": dep.postprocessing}
        steps = [{"model": roles[role], "inputs": ins, "outputs": outs} for role, ins, outs in c.ENSEMBLE_STEPS]
        common = {"deployment": str(dep), "max_batch_size": max_batch_size, "inputs": c.ENSEMBLE_INPUTS,
                  "outputs": c.ENSEMBLE_OUTPUTS}
        self.write_model("llm", dep.llm, steps=steps, stream_model=dep.llm_stream, **common)
        stream = self.write_model("llm_stream", dep.llm_stream, preprocessing_model=dep.preprocessing,
                                  engine_model=dep.llm_engine, **common)
        self.copy_tokenizer(hf_dir, stream / "1" / "tokenizer")
        return [dep.llm_engine_call, dep.llm, dep.llm_stream]

    # -- embedding deployments ------------------------------------------------------------------
    def write_embedding_models(self, dep: DeploymentName, hf_dir: Path, config: EmbeddingConfig, engine_dir: Path,
                               max_batch_size: int, compute: str) -> list[str]:
        """The CPU encoder, which pools in its own process (its OpenVINO files move into `1/engine/`),
        and the pipeline around it."""
        io = c.embedding_tensors(config.encoder_inputs, config.hidden_size, config.dimension)
        encoder = self.write_model("embedding_encoder", dep.embedding_encoder, inputs=io["encoder"][0],
                                   outputs=io["pooling"][1], quantization=PRECISIONS[dep.precision].openvino,
                                   compute=compute, chunk_texts=CHUNK_TEXTS, chunk_tokens=CHUNK_TOKENS,
                                   **_pooling_params(config), deployment=str(dep), max_batch_size=max_batch_size)
        config.save(encoder / "1")
        shutil.move(str(engine_dir), str(encoder / "1" / "engine"))
        return self.write_embedding_pipeline(dep, hf_dir, config, max_batch_size, c.EMBEDDING, pooling_model=False)

    def write_embedding_pipeline(self, dep: DeploymentName, hf_dir: Path, config: EmbeddingConfig,
                                 max_batch_size: int, encoder_output: str, pooling_model: bool = True) -> list[str]:
        """Tokenize (shared by every precision of one name) and the ensemble users call around the
        encoder model `dep.embedding_encoder` (already written), whose output is `encoder_output`: the
        embedding itself when it pools (the CPU encoder, `pooling_model=False`), else token embeddings
        (`last_hidden_state` of a TensorRT plan) for a shared Python pooling model written here."""
        io = c.embedding_tensors(config.encoder_inputs, config.hidden_size, config.dimension)
        shared = {"deployment": dep.name, "max_batch_size": max_batch_size}   # identical for every precision
        tokenize = self.write_model("embedding_tokenize", dep.embedding_tokenize, inputs=io["tokenize"][0],
                                    outputs=io["tokenize"][1], max_length=config.max_length, **shared)
        (tokenize / "1" / "tokenizer").mkdir()
        shutil.copyfile(Path(hf_dir) / "tokenizer.json", tokenize / "1" / "tokenizer" / "tokenizer.json")
        config.save(tokenize / "1" / "tokenizer")
        token_names = [t.name for t in io["tokenize"][1]]
        steps = [
            {"model": dep.embedding_tokenize, "inputs": {c.TEXT: c.TEXT, c.TRUNCATE: c.TRUNCATE},
             "outputs": {n: n for n in token_names}},
            {"model": dep.embedding_encoder, "inputs": {n: n for n in token_names},
             "outputs": {encoder_output: c.TOKEN_EMBEDDINGS if pooling_model else c.EMBEDDING}},
        ]
        if pooling_model:
            pooling = self.write_model("embedding_pooling", dep.embedding_pooling, inputs=io["pooling"][0],
                                       outputs=io["pooling"][1], **_pooling_params(config), **shared)
            config.save(pooling / "1")
            steps.append({"model": dep.embedding_pooling, "inputs": {c.TOKEN_EMBEDDINGS: c.TOKEN_EMBEDDINGS,
                                                                      "attention_mask": "attention_mask"},
                          "outputs": {c.EMBEDDING: c.EMBEDDING}})
        self.write_model("embedding", dep.embedding, inputs=io["ensemble"][0], outputs=io["ensemble"][1], steps=steps,
                         dimension=config.dimension, deployment=str(dep), max_batch_size=max_batch_size)
        return dep.embedding_models(pooling_model)


def _pooling_params(config: EmbeddingConfig) -> dict:
    """What the config.pbtxt comment says of the pooling, wherever it runs (CPU encoder, pooling model)."""
    return {"pooling": " + ".join(config.pooling), "normalize": config.normalize,
            "pooling_source": config.pooling_source}
