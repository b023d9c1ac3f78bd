"""The engine targets, keyed by (kind, engine): the build pipeline and `--dry-run` look a
deployment's target up here. Adding a target is one module implementing
builder.build.engine_target.EngineTarget and one row below."""

from __future__ import annotations

from backends.errors import InvalidArgumentError
from builder.build.engine_target import EngineTarget
from builder.build.engines import openvino_encoder, openvino_llm, tensorrt_encoder, tensorrt_llm

TARGETS: dict[tuple[str, str], EngineTarget] = {
    ("llm", "cpu"): openvino_llm,
    ("llm", "tensorrt-llm"): tensorrt_llm,
    ("embedding", "cpu"): openvino_encoder,
    ("embedding", "tensorrt-llm"): tensorrt_encoder,
}


def target_for(kind: str, engine: str) -> EngineTarget:
    try:
        return TARGETS[(kind, engine)]
    except KeyError:
        choices = ", ".join(f"{k}/{e}" for k, e in TARGETS)
        raise InvalidArgumentError(f"no engine target builds {kind} models with engine {engine!r}: "
                                   f"choose from {choices}") from None
