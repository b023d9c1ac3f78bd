"""Runtime settings of a CPU LLM engine: how the OpenVINO CPU plugin computes (f32 or bf16), how it
stores the KV cache (u8, f16 or f32) and whether it quantizes activations on the fly for int
weights (DYNAMIC_QUANTIZATION_GROUP_SIZE).

fp32 is the reference and always runs the reference setting (f32 compute, f32 KV cache): it stays
token-for-token equal to transformers. Every other precision gets, per ISA class, the fastest
candidate whose accuracy against fp32 passed the precision's floors when the engine was built
(builder/build/engines/openvino_runtime.py measures them and writes SETTINGS_FILE beside the
engine). At load the engine picks the entry of the host's class (backends.cpu_isa); a class the
build could not measure (a stronger host than the build host) or an engine built before this file
existed runs the reference setting, which is never wrong, only slower. docs/cpu-performance.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from backends.cpu_isa import host_isa_class

SETTINGS_FILE = "runtime_settings.json"
# The CPU plugin keeps the kernels it built for each input shape in an LRU of 5000 entries by
# default. With dynamic shapes (every prompt length, every batch of texts) a serving process grew
# by ~0.35 MB per new shape and never stopped: the encoder from 330 to 770 MB over 1200 random
# shapes, the LLM engine past the soak's 5% bound. 64 entries keep the shapes that recur (decode
# steps, common lengths) at no measurable cost, and memory levels off (docs/reliability.md, Soak).
RUNTIME_CACHE = {"CPU_RUNTIME_CACHE_CAPACITY": "64"}
DQ_GROUP = 32                           # the CPU plugin's default group for int weights (2026.4)


@dataclass(frozen=True)
class RuntimeSetting:
    compute: str = "f32"           # INFERENCE_PRECISION_HINT: f32 | bf16
    kv_cache: str = "f32"          # KV_CACHE_PRECISION: u8 | f16 | f32
    dynamic_quantization: int = 0  # DYNAMIC_QUANTIZATION_GROUP_SIZE (0: off; int weights only)

    def properties(self) -> dict[str, str]:
        """The CPU plugin properties of this setting."""
        return {"INFERENCE_PRECISION_HINT": self.compute, "KV_CACHE_PRECISION": self.kv_cache,
                "DYNAMIC_QUANTIZATION_GROUP_SIZE": str(self.dynamic_quantization), **RUNTIME_CACHE}

    def describe(self) -> str:
        dq = f"activations int8 in groups of {self.dynamic_quantization}" if self.dynamic_quantization else "no dynamic quantization"
        return f"{self.compute} compute, {self.kv_cache} KV cache, {dq}"


REFERENCE = RuntimeSetting()


def candidates(isa_class: str, precision: str) -> list[RuntimeSetting]:
    """The settings worth measuring on this class, fastest first; the last is always the reference
    setting. A compressed KV cache before a wider one; int8 activations before none for int
    weights; bf16 compute before f32 where the CPU has it, except int weights on avx512_bf16 CPUs
    without AMX (Zen4): there bf16 measured no faster than f32 for int8, while fp8 weights ran
    ~1.8x faster at bf16 (docs/cpu-performance.md)."""
    if precision == "fp32" or isa_class == "baseline":
        return [REFERENCE]
    int_weights = precision.startswith("int")
    computes = {"amx": ("bf16", "f32"),
                "avx512_bf16": ("f32", "bf16") if int_weights else ("bf16", "f32")}.get(isa_class, ("f32",))
    groups = (DQ_GROUP, 0) if int_weights else (0,)
    out = [RuntimeSetting(c, kv, g) for g in groups for kv in ("u8", "f16", "f32") for c in computes]
    return [s for s in out if s != REFERENCE] + [REFERENCE]


@dataclass(frozen=True)
class Choice:
    """The setting an engine runs with on this host, and why."""
    isa_class: str
    setting: RuntimeSetting
    measured: bool      # False: the reference setting, as nothing was measured for this class
    reason: str

    def as_dict(self) -> dict:
        return {"isa_class": self.isa_class, **asdict(self.setting), "measured": self.measured, "reason": self.reason}


def read_settings(engine_dir: Path) -> dict:
    """The per-class table the build recorded ({} for an engine built before it existed)."""
    path = Path(engine_dir) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def choose(table: dict, isa_class: str) -> Choice:
    """The recorded setting for this class, or the reference setting with the reason."""
    entry = (table.get("classes") or {}).get(isa_class)
    if table.get("precision") == "fp32":
        return Choice(isa_class, REFERENCE, True, "fp32 is the reference: f32 compute and KV cache")
    if entry is None:
        why = ("the engine predates per-host settings" if not table else
               f"the build measured {', '.join(table.get('classes') or {}) or 'no class'}, not {isa_class}; "
               "rebuild on a host of this class for faster settings")
        return Choice(isa_class, REFERENCE, False, why)
    setting = RuntimeSetting(entry["compute"], entry["kv_cache"], int(entry["dynamic_quantization"]))
    return Choice(isa_class, setting, True,
                  f"fastest setting measured on {isa_class} that passes the {table['precision']} floors "
                  f"(top-1 {entry['top1_agreement']}, logit cosine {entry['mean_logit_cosine']})")


def choose_for_host(engine_dir: Path) -> Choice:
    return choose(read_settings(engine_dir), host_isa_class())
