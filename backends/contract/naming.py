"""The one place that maps user-facing deployment names to Triton model names.

Users say `<name>:<precision>` (`smollm2-135m-instruct:int8`). Triton model names must stay
URL-safe: tritonclient's HTTP client percent-encodes ':' and Triton answers 404, so every Triton
name below is built from `<name>-<precision>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backends.contract.precisions import PRECISIONS, check_precision
from backends.errors import InvalidArgumentError

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_name(name: str) -> str:
    """Return `name` if it can be a deployment name, else raise with the rule it breaks."""
    if not _NAME.match(name or "") or name.endswith(("-", ".", "_")):
        raise InvalidArgumentError(
            f"invalid deployment name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. smollm2-135m-instruct)"
        )
    return name


@dataclass(frozen=True)
class DeploymentName:
    """`<name>:<precision>` and every Triton model name that belongs to it."""

    name: str
    precision: str

    @classmethod
    def parse(cls, user_name: str) -> "DeploymentName":
        """Parse `name:precision`; refuses a missing or unknown precision."""
        name, sep, precision = user_name.rpartition(":")
        if not sep:
            raise InvalidArgumentError(
                f"model {user_name!r} has no precision: write it as NAME:PRECISION, "
                f"e.g. {user_name}:int8 ({', '.join(PRECISIONS)})"
            )
        return cls(check_name(name), check_precision(precision))

    def __post_init__(self) -> None:
        check_name(self.name)
        check_precision(self.precision)

    def __str__(self) -> str:
        return f"{self.name}:{self.precision}"

    # -- LLM deployments -------------------------------------------------------------------
    @property
    def llm(self) -> str:
        """The ensemble (not decoupled): tritonclient infer (HTTP, gRPC) and /generate."""
        return f"{self.name}-{self.precision}"

    @property
    def llm_stream(self) -> str:
        """Decoupled: token streaming (gRPC stream_infer, /generate_stream)."""
        return f"{self.name}-{self.precision}-stream"

    @property
    def llm_engine(self) -> str:
        """The engine (decoupled, in-flight batching): CPU or tensorrtllm."""
        return f"{self.name}-{self.precision}-engine"

    @property
    def llm_engine_call(self) -> str:
        """Non-decoupled adapter the ensemble calls the engine through."""
        return f"{self.name}-{self.precision}-engine-call"

    @property
    def preprocessing(self) -> str:
        """Precision-independent, shared by every precision of one name."""
        return f"{self.name}-preprocessing"

    @property
    def postprocessing(self) -> str:
        """Precision-independent, shared by every precision of one name."""
        return f"{self.name}-postprocessing"

    def llm_models(self) -> list[str]:
        return [self.preprocessing, self.postprocessing, self.llm_engine, self.llm_engine_call, self.llm,
                self.llm_stream]

    # -- embedding deployments ---------------------------------------------------------------
    @property
    def embedding(self) -> str:
        """Ensemble: texts in, `embedding` out."""
        return f"{self.name}-{self.precision}"

    @property
    def embedding_encoder(self) -> str:
        return f"{self.name}-{self.precision}-encoder"

    @property
    def embedding_tokenize(self) -> str:
        return f"{self.name}-tokenize"

    @property
    def embedding_pooling(self) -> str:
        return f"{self.name}-pooling"

    def embedding_models(self, pooling_model: bool = False) -> list[str]:
        """The CPU encoder pools in its own process; a TensorRT encoder needs the Python pooling model."""
        pooling = [self.embedding_pooling] if pooling_model else []
        return [self.embedding_tokenize, self.embedding_encoder, *pooling, self.embedding]


# Suffixes of per-precision Triton models, longest first ("-engine-call" before "-engine").
_ROLE_SUFFIXES = ("-engine-call", "-engine", "-stream", "-encoder")


def deployment_of(triton_model: str) -> str | None:
    """`name:precision` of the deployment a per-precision Triton model belongs to, or None for a
    model shared by every precision of a name (preprocessing, tokenize, ...): metrics label
    deployments the way users name them."""
    base = triton_model
    for suffix in _ROLE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    name, sep, precision = base.rpartition("-")
    if not sep or precision not in PRECISIONS or not _NAME.match(name) or name.endswith(("-", ".", "_")):
        return None
    return f"{name}:{precision}"
