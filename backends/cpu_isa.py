"""The host's ISA class: which CPU kernels OpenVINO can pick here, and so which runtime setting of
an LLM engine was measured for this kind of host (backends.cpu_runtime).

Classes are ordered, each a superset of the one before. The build measures every class up to its
own host's (capping oneDNN with ONEDNN_MAX_CPU_ISA, see builder/build/engines/openvino_runtime.py);
serving reads /proc/cpuinfo, and honours the same cap when it is set, so one host can run and test
the paths of the classes below its own.
"""

from __future__ import annotations

import os
from pathlib import Path

# weakest first; "baseline" is below AVX2 (no setting beyond the fp32 reference is measured for it)
ISA_CLASSES = ("baseline", "avx2", "avx512", "avx512_bf16", "amx")

# /proc/cpuinfo flags each class needs (on top of the class before it)
_REQUIRES = {
    "avx2": {"avx2", "fma"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_bf16": {"avx512_bf16"},
    "amx": {"amx_tile", "amx_bf16"},
}

# ONEDNN_MAX_CPU_ISA value that restricts oneDNN to each class's weakest member, and back
ONEDNN_CAP = {"avx2": "AVX2", "avx512": "AVX512_CORE", "avx512_bf16": "AVX512_CORE_BF16",
              "amx": "AVX512_CORE_AMX"}
_CAP_CLASS = {"SSE41": "baseline", "AVX": "baseline", "AVX2": "avx2", "AVX2_VNNI": "avx2", "AVX2_VNNI_2": "avx2",
              "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512", "AVX512_CORE_BF16": "avx512_bf16",
              "AVX10_1_512": "avx512_bf16", "AVX512_CORE_FP16": "avx512_bf16", "AVX512_CORE_AMX": "amx",
              "AVX10_1_512_AMX": "amx", "AVX512_CORE_AMX_FP16": "amx", "AVX10_1_512_AMX_FP16": "amx"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The flags of the first processor listed (empty when /proc/cpuinfo cannot be read)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_class(flags: set[str], cap: str | None = None) -> str:
    """The strongest class whose flags (and every weaker class's) are all present, lowered to
    the class of `cap` (an ONEDNN_MAX_CPU_ISA value) when one is given and known."""
    found = "baseline"
    for name in ISA_CLASSES[1:]:
        if not _REQUIRES[name] <= flags:
            break
        found = name
    capped = _CAP_CLASS.get((cap or "").strip().upper())
    if capped is not None and not at_least(capped, found):
        return capped
    return found


def at_least(name: str, minimum: str) -> bool:
    """Whether class `name` has every kernel of class `minimum` (classes are ordered supersets)."""
    return ISA_CLASSES.index(name) >= ISA_CLASSES.index(minimum)


def host_isa_class() -> str:
    """This host's class, as the CPU plugin's kernels will see it."""
    return isa_class(cpu_flags(), os.environ.get("ONEDNN_MAX_CPU_ISA"))


def classes_up_to(name: str) -> list[str]:
    """Every measurable class from AVX2 up to and including `name` (none below AVX2)."""
    return [c for c in ISA_CLASSES[1:ISA_CLASSES.index(name) + 1]]
