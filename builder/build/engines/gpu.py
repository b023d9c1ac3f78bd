"""What GPU and TensorRT this host has: the facts a TensorRT engine is tied to.

A TensorRT (or TensorRT-LLM) engine only runs on the TensorRT version and GPU architecture
(compute capability) it was built for, so the builder records both and the server checks them
before loading. Detection never imports CUDA: it asks `nvidia-smi` first (present on every GPU
host, even without Python CUDA packages) and falls back to torch when that is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

_SMI_QUERY = "name,compute_cap,memory.total,driver_version"

# Architecture family per compute-capability major.minor, for messages people can read.
_FAMILIES = {
    (7, 0): "Volta", (7, 2): "Volta", (7, 5): "Turing",
    (8, 0): "Ampere", (8, 6): "Ampere", (8, 7): "Ampere", (8, 9): "Ada Lovelace",
    (9, 0): "Hopper", (10, 0): "Blackwell", (10, 3): "Blackwell", (12, 0): "Blackwell", (12, 1): "Blackwell",
}


@dataclass(frozen=True)
class GpuInfo:
    """One kind of GPU on this host (`count` identical devices)."""

    name: str
    compute_capability: tuple[int, int]
    memory_mib: int | None = None
    driver: str | None = None
    count: int = 1

    @property
    def cc(self) -> str:
        """Compute capability as the manifest stores it, e.g. "9.0"."""
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def family(self) -> str:
        return _FAMILIES.get(self.compute_capability, "unknown architecture")

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.cc}, {self.family})"


def parse_compute_capability(text: str) -> tuple[int, int]:
    """'8.9' / '89' / 'sm_89' -> (8, 9); raises ValueError on anything else."""
    t = str(text).strip().lower().removeprefix("sm_").removeprefix("sm")
    if m := re.fullmatch(r"(\d+)\.(\d+)", t):
        return int(m[1]), int(m[2])
    if m := re.fullmatch(r"(\d+)(\d)", t):
        return int(m[1]), int(m[2])
    raise ValueError(f"not a compute capability: {text!r}")


def parse_nvidia_smi(csv_text: str) -> list[GpuInfo]:
    """Group `nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version` rows by kind."""
    kinds: dict[tuple, int] = {}
    for line in csv_text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 2 or not cells[0]:
            continue
        try:
            cc = parse_compute_capability(cells[1])
        except ValueError:
            continue
        mem = int(cells[2]) if len(cells) > 2 and cells[2].isdigit() else None
        driver = cells[3] if len(cells) > 3 and cells[3] else None
        key = (cells[0], cc, mem, driver)
        kinds[key] = kinds.get(key, 0) + 1
    return [GpuInfo(n, cc, m, d, count) for (n, cc, m, d), count in kinds.items()]


def _from_nvidia_smi(run=subprocess.run) -> list[GpuInfo] | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = run([smi, f"--query-gpu={_SMI_QUERY}", "--format=csv,noheader,nounits"],
                  capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return parse_nvidia_smi(out.stdout)


def _from_torch() -> list[GpuInfo] | None:
    try:
        import torch  # noqa: PLC0415 - optional, only when nvidia-smi is missing
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return []
    gpus = [GpuInfo(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
            for i in range(torch.cuda.device_count())]
    grouped: dict[GpuInfo, int] = {}
    for g in gpus:
        grouped[g] = grouped.get(g, 0) + 1
    return [GpuInfo(g.name, g.compute_capability, count=n) for g, n in grouped.items()]


def host_gpus() -> list[GpuInfo]:
    """Every kind of GPU on this host; empty when there is none (or no driver)."""
    found = _from_nvidia_smi()
    if found is None:
        found = _from_torch()
    return found or []


def host_gpu() -> GpuInfo | None:
    """The GPU engines are built for here: the first kind found (None: no GPU).

    Mixed GPU kinds in one host are unusual; engines target one architecture, so the first kind
    is the one that counts (`count` says how many of them there are).
    """
    gpus = host_gpus()
    return gpus[0] if gpus else None


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


_TRT_HEADERS = (Path("/usr/local/tensorrt/include/NvInferVersion.h"),
                Path("/usr/include/x86_64-linux-gnu/NvInferVersion.h"),
                Path("/usr/include/aarch64-linux-gnu/NvInferVersion.h"))


def _version_from_header(path: Path) -> str | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    parts = [re.search(rf"#define\s+{k}\s+(\d+)", text) for k in
             ("NV_TENSORRT_MAJOR", "NV_TENSORRT_MINOR", "NV_TENSORRT_PATCH", "NV_TENSORRT_BUILD")]
    if not all(parts[:3]):
        return None
    return ".".join(p[1] for p in parts if p)


def tensorrt_version() -> str | None:
    """The TensorRT runtime version on this host (engines must match it exactly).

    Order: the Python wheel, `TRT_VERSION` (set by the NGC TensorRT-LLM images), the C headers.
    """
    v = _dist_version("tensorrt", "tensorrt-cu13", "tensorrt_cu13", "tensorrt-cu12", "tensorrt_cu12",
                      "tensorrt-cu13-libs", "tensorrt_cu13_libs", "tensorrt-cu12-libs", "tensorrt_cu12_libs")
    if v:
        return v
    if env := os.environ.get("TRT_VERSION"):
        return env.strip()
    for header in _TRT_HEADERS:
        if v := _version_from_header(header):
            return v
    return None


def tensorrt_llm_version() -> str | None:
    return _dist_version("tensorrt-llm", "tensorrt_llm")


def _numeric_fields(version: str) -> list[int]:
    fields = []
    for part in version.strip().split("."):
        if not part.isdigit():
            break
        fields.append(int(part))
    return fields


def same_tensorrt(a: str, b: str) -> bool:
    """Whether an engine built with TensorRT `a` loads on TensorRT `b`.

    TensorRT refuses plans from any other build ("expecting library version 9.2.0.4 got
    9.2.0.5"), so every numeric field both versions state must match; a version that states only
    major.minor.patch (some wheels) is compared on those three.
    """
    fa, fb = _numeric_fields(a), _numeric_fields(b)
    n = min(len(fa), len(fb))
    return n >= 3 and fa[:n] == fb[:n]
