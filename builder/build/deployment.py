"""What to build: one `DeploymentSpec` per model, from command-line options or a deployment file.

A deployment file (TOML) describes several models and the serving edge:

    [serving]
    allowed_ips = ["203.0.113.0/24"]          # empty or absent: everyone allowed

    [[models]]
    name = "smollm2-135m-instruct"
    kind = "llm"                              # llm | embedding
    source = "default"                        # HF directory, GGUF file, or "default"
    precisions = ["fp16", "int8", "fp8"]
    context_size = 2048
    max_batch_size = 8
    idle_timeout = 600                        # serving: unloaded after 10 idle minutes (0: never)
    max_queue = 16                            # serving: requests queued past max_batch_size, then 429
    prompt_lookup = false                     # CPU LLM: prompt-lookup decoding for answers that copy the prompt

    [[models]]
    name = "all-minilm-l6-v2"
    kind = "embedding"
    precisions = ["int8"]
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from backends.contract.naming import check_name
from backends.contract.precisions import DEFAULT_PRECISIONS, LLM_ONLY, PRECISIONS
from backends.contract.precisions import check_precision as _check_precision
from backends.errors import InvalidArgumentError, SourceError

KINDS = ("llm", "embedding")
ENGINES = ("auto", "cpu", "tensorrt-llm")
POOLINGS = ("mean", "cls", "last")
# LLM: requests batched in flight per engine (16: the CPU engine's tokens/s still grows from 8 to 16
# and 32 sequences, docs/cpu-performance.md, and its KV cache grows only as used). Embedding: texts
# per request (Triton refuses more).
DEFAULT_MAX_BATCH = {"llm": 16, "embedding": 64}


@dataclass
class DeploymentSpec:
    name: str
    kind: str = "llm"
    source: str = "default"                 # path to HF dir / GGUF file, or "default"
    precisions: list[str] = field(default_factory=lambda: list(DEFAULT_PRECISIONS))
    context_size: int | None = None         # None: the model's own position limit (LLM) / max length
    max_batch_size: int | None = None      # None: 16 requests in flight (llm), 64 texts a request (embedding)
    engine: str = "auto"                    # resolved to "cpu" or "tensorrt-llm" before building
    pooling: str | None = None              # embedding: override when the checkpoint has no 1_Pooling
    idle_timeout: int | None = None         # serving: seconds idle before unloaded (serve --idle-timeout otherwise)
    max_queue: int | None = None            # serving: queued past max_batch_size before 429 (serve --max-queue otherwise)
    prompt_lookup: bool = False             # CPU LLM engine: prompt-lookup decoding for every request
    # CPU engines: measure the engine's resident memory under a load test at build (~20 s per LLM
    # precision on 2 cores); False: the manifest records an estimate from the weights instead
    memory_test: bool = True
    # TensorRT-LLM only
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    max_num_tokens: int | None = None
    calibration_dataset: str | None = None
    int8_kv_cache: bool = False

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"unknown kind {self.kind!r} for {self.name}: choose llm or embedding")
        if self.engine not in ENGINES:
            raise InvalidArgumentError(f"unknown engine {self.engine!r}: choose from {', '.join(ENGINES)}")
        if not self.precisions:
            raise InvalidArgumentError(f"{self.name}: no precision given")
        self.precisions = list(dict.fromkeys(_check_precision(p) for p in self.precisions))
        if self.kind == "embedding" and (llm_only := [p for p in self.precisions if p in LLM_ONLY]):
            works = [p for p in PRECISIONS if p not in LLM_ONLY]
            raise InvalidArgumentError(f"{self.name}: {', '.join(llm_only)} is for LLMs only (embeddings miss its "
                                       f"accuracy floor): choose from {', '.join(works)} for embeddings")
        if self.context_size is not None and self.context_size < 16:
            raise InvalidArgumentError(f"context size {self.context_size} is too small: use at least 16 tokens")
        if self.max_batch_size is None:
            self.max_batch_size = DEFAULT_MAX_BATCH[self.kind]
        if not 1 <= self.max_batch_size <= 256:
            raise InvalidArgumentError(f"max batch size {self.max_batch_size} is out of range: use 1 to 256")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise InvalidArgumentError(f"unknown pooling {self.pooling!r}: choose from {', '.join(POOLINGS)}")
        if self.idle_timeout is not None and (not isinstance(self.idle_timeout, int) or self.idle_timeout < 0):
            raise InvalidArgumentError(f"{self.name}: idle_timeout must be whole seconds >= 0 (0: never unloaded)")
        if self.max_queue is not None and (not isinstance(self.max_queue, int) or self.max_queue < 0):
            raise InvalidArgumentError(f"{self.name}: max_queue must be a whole number of requests >= 0")
        if not isinstance(self.prompt_lookup, bool):
            raise InvalidArgumentError(f"{self.name}: prompt_lookup must be true or false")
        if not isinstance(self.memory_test, bool):
            raise InvalidArgumentError(f"{self.name}: memory_test must be true or false")
        if self.prompt_lookup and self.kind != "llm":
            raise InvalidArgumentError(f"{self.name}: prompt_lookup is for LLM deployments: remove it from this "
                                       f"{self.kind} deployment")
        if self.engine != "auto":
            self.check_engine_features(self.engine)
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise InvalidArgumentError("tensor and pipeline parallel sizes must be at least 1")

    def check_engine_features(self, engine: str) -> None:
        """Refuse what `engine` cannot do: here when the engine is named, again by the build once
        `auto` has become one."""
        if self.prompt_lookup and engine != "cpu":
            raise InvalidArgumentError(f"{self.name}: prompt_lookup runs on the CPU engine only, and this deployment "
                                       f"builds {engine}: remove it, or build with engine = \"cpu\" (--engine cpu)")


@dataclass
class ServingSpec:
    allowed_ips: list[str] = field(default_factory=list)
    trusted_proxies: list[str] = field(default_factory=list)


def load_deployment_file(path: Path) -> tuple[list[DeploymentSpec], ServingSpec]:
    """Read a deployment TOML file; every error names the file and the key."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise SourceError(f"cannot read deployment file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgumentError(f"{path} is not valid TOML ({e}): fix the syntax") from None
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise InvalidArgumentError(f"{path} lists no [[models]]: add at least one [[models]] table with a name")
    known = {f for f in DeploymentSpec.__dataclass_fields__}
    specs = []
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "name" not in m:
            raise InvalidArgumentError(f"{path}: models[{i}] has no name")
        unknown = set(m) - known
        if unknown:
            raise InvalidArgumentError(
                f"{path}: models[{i}] has unknown keys {sorted(unknown)}: allowed are {sorted(known)}")
        m = dict(m)
        if "source" in m and m["source"] != "default" and not Path(m["source"]).is_absolute():
            m["source"] = str((Path(path).parent / m["source"]).resolve())
        specs.append(DeploymentSpec(**m))
    names = [(s.name, s.kind) for s in specs]
    if len({n for n, _ in names}) != len(names):
        raise InvalidArgumentError(f"{path}: a model name appears twice: names must be unique")
    serving = data.get("serving", {}) or {}
    unknown = set(serving) - set(ServingSpec.__dataclass_fields__)
    if unknown:
        raise InvalidArgumentError(f"{path}: [serving] has unknown keys {sorted(unknown)}")
    return specs, ServingSpec(**serving)
