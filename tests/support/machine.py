"""What every benchmark prints beside its figures: the CPU it ran on and the ISA flags that decide
which kernels OpenVINO and llama.cpp pick (AVX2, AVX-512, VNNI, bf16, AMX)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_description() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    isa = " ".join(f for f in FLAGS if f in flags) or "no AVX2"
    return f"{model}, {os.cpu_count()} cores, ISA: {isa}"
