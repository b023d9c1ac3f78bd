#!/usr/bin/env python3
"""Check GPU engines on a GPU host: build the default models at every precision this GPU supports,
then compare their answers and accuracy with the fp32 reference.

Run inside the docker/Dockerfile.gpu image on a GPU host:

    python3 scripts/gpu_check.py --output /tmp/gpu-check
    python3 scripts/gpu_check.py --dry-run            # the build plans only; no GPU needed

What it does
1. host: GPU (nvidia-smi), TensorRT-LLM 1.2.x, TensorRT version;
2. `build-engines --engine tensorrt-llm` for the default LLM (SmolLM2-135M-Instruct) and the
   default embedding model (all-MiniLM-L6-v2) at every supported precision;
3. LLM accuracy: for each prompt, the fp32 reference (transformers, float32, CPU) decodes greedily;
   the engine then predicts the next token after every reference prefix (teacher-forced top-1
   agreement) and decodes greedily on its own (answer agreement). Top-1 is held to the precision's
   floor in builder/precisions.py;
4. embedding accuracy: cosine similarity of each TensorRT plan's mean-pooled, normalized embedding
   with the fp32 reference (transformers, CPU) over fixed sentences, against the floors;
5. optionally (--serve) `serverless-triton serve` the repository and ask every deployment once.

Exit status 0 only when every precision met its floor. Prints one line per check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.contract.naming import DeploymentName  # noqa: E402
from backends.contract.precisions import PRECISIONS  # noqa: E402
from builder.build.deployment import DeploymentSpec  # noqa: E402
from builder.build.engines import gpu, tensorrt_encoder, tensorrt_llm  # noqa: E402
from builder.paths import cache_root  # noqa: E402

PROMPTS = (
    "The capital of France is",
    "Write one sentence about the ocean:",
    "def add(a, b):\n    return",
    "Three primary colors are",
    "Q: What is 12 plus 30?\nA:",
)
SENTENCES = (
    "A man is eating food.", "The new movie is awesome.", "The cat sits outside.",
    "A woman is playing violin.", "Two men pushed carts through the woods.",
    "How do I reset my password?", "Quantum computers use qubits.", "Le chat dort sur le canapé.",
)
NEW_TOKENS = 32
LLM_NAME, EMBEDDING_NAME = "smollm2-135m-instruct", "all-minilm-l6-v2"


def say(ok: bool | None, what: str) -> None:
    mark = {True: "PASS", False: "FAIL", None: "INFO"}[ok]
    print(f"[{mark}] {what}", flush=True)


def default_checkpoint(kind: str, cache_dir: Path) -> Path:
    from builder.build.sources.checkpoint import resolve

    return resolve("default", kind, cache_dir).hf_dir


# -- host and build --------------------------------------------------------------------------

def host_report() -> tuple[gpu.GpuInfo, list[str]]:
    host = gpu.host_gpu()
    if host is None:
        raise SystemExit("no NVIDIA GPU found (nvidia-smi): run this on a GPU host")
    say(None, f"GPU {host.describe()} x{host.count}; TensorRT-LLM {gpu.tensorrt_llm_version()}; "
              f"TensorRT {gpu.tensorrt_version()}")
    precisions = tensorrt_llm.supported_precisions(host)
    skipped = [p for p in tensorrt_llm.GPU_PRECISIONS if p not in precisions]
    if skipped:
        say(None, f"skipping {', '.join(skipped)}: not supported on compute capability {host.cc}")
    return host, precisions


def build(kind: str, precisions: list[str], output: Path) -> None:
    cmd = ["build-engines", "--kind", kind, "--engine", "tensorrt-llm", "--precision", ",".join(precisions),
           "-o", str(output)]
    say(None, " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True)
    say(True, f"{kind} engines built in {time.time() - t0:.0f} s")


# -- LLM accuracy ---------------------------------------------------------------------------

def reference_greedy(hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append((ids[0].tolist(), gen[0, ids.shape[1]:].tolist()))
    return tok, out


def engine_runner(engine_dir: Path):
    from tensorrt_llm.runtime import ModelRunnerCpp

    return ModelRunnerCpp.from_dir(engine_dir=str(engine_dir), rank=0)


def generate(runner, batch: list[list[int]], new_tokens: int, end_id: int) -> list[list[int]]:
    import torch

    out = runner.generate([torch.tensor(ids, dtype=torch.int32) for ids in batch], max_new_tokens=new_tokens,
                          end_id=end_id, pad_id=end_id, top_k=1, temperature=1.0, return_dict=True)
    ids, lengths = out["output_ids"], out["sequence_lengths"]
    return [ids[i][0][len(batch[i]):int(lengths[i][0])].tolist() for i in range(len(batch))]


def llm_accuracy(repo: Path, precision: str, tok, reference, max_batch: int) -> bool:
    dep = DeploymentName(LLM_NAME, precision)
    runner = engine_runner(tensorrt_llm.engine_dir_in(repo, dep))
    end_id = tok.eos_token_id
    agree = total = same_answers = 0
    for prompt_ids, ref in reference:
        prefixes = [prompt_ids + ref[:i] for i in range(len(ref))]
        for start in range(0, len(prefixes), max_batch):
            chunk = prefixes[start:start + max_batch]
            preds = generate(runner, chunk, 1, end_id)
            agree += sum(1 for p, i in zip(preds, range(start, start + len(chunk))) if p[:1] == [ref[i]])
            total += len(chunk)
        answer = generate(runner, [prompt_ids], NEW_TOKENS, end_id)[0]
        same_answers += answer[:len(ref)] == ref
    top1 = agree / max(total, 1)
    floor = PRECISIONS[precision].llm_min_top1
    ok = top1 >= floor
    say(ok, f"{dep}: teacher-forced top-1 agreement {top1:.4f} (floor {floor}); greedy answers identical to "
            f"fp32 for {same_answers}/{len(reference)} prompts")
    return ok


# -- embedding accuracy ---------------------------------------------------------------------

def reference_embeddings(hf_dir: Path, length: int = 128):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModel.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    batch = tok(list(SENTENCES), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return batch, mean_pool(hidden, batch["attention_mask"])


def mean_pool(hidden, mask):
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def run_plan(plan: Path, feeds: dict):
    """Run a TensorRT plan once (TensorRT 10 named-tensor API) and return its outputs by name."""
    import tensorrt as trt_rt
    import torch

    engine = trt_rt.Runtime(trt_rt.Logger(trt_rt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    ctx = engine.create_execution_context()
    inputs = {n: t.to("cuda").contiguous() for n, t in feeds.items()}
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt_rt.TensorIOMode.INPUT:
            ctx.set_input_shape(name, tuple(inputs[name].shape))
            ctx.set_tensor_address(name, inputs[name].data_ptr())
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt_rt.TensorIOMode.OUTPUT:
            outputs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            ctx.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.current_stream()
    ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {n: t.cpu() for n, t in outputs.items()}


def embedding_accuracy(repo: Path, precision: str, batch, reference) -> bool:
    dep = DeploymentName(EMBEDDING_NAME, precision)
    plan = tensorrt_encoder.engine_dir_in(repo, dep) / tensorrt_encoder.PLAN_NAME
    feeds = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    out = run_plan(plan, feeds)
    emb = mean_pool(out["token_embeddings"], batch["attention_mask"])
    cos = (emb * reference).sum(-1)
    p = PRECISIONS[precision]
    ok = float(cos.min()) >= p.embedding_min_cosine and float(cos.mean()) >= p.embedding_mean_cosine
    say(ok, f"{dep}: cosine vs fp32 min {float(cos.min()):.5f} / mean {float(cos.mean()):.5f} "
            f"(floors {p.embedding_min_cosine} / {p.embedding_mean_cosine})")
    return ok


# -- serving ------------------------------------------------------------------------------

def serve_and_ask(repo: Path, precisions: list[str], embeddings: bool, port: int = 18000) -> bool:
    import urllib.request

    proc = subprocess.Popen(["serverless-triton", "serve", "-r", str(repo), "--no-proxy", "--http-port", str(port),
                             "--grpc-port", str(port + 1), "--metrics-port", str(port + 2),
                             "--tritonserver", "/opt/tritonserver/bin/tritonserver"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "ready":
                break
        else:
            say(False, "serve exited before it was ready")
            return False
        ok = True
        for p in precisions:
            dep = DeploymentName(LLM_NAME, p)
            body = json.dumps({"text_input": PROMPTS[0], "max_tokens": 16}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{dep.llm}/generate", data=body,
                                         headers={"Content-Type": "application/json"})
            answer = json.loads(urllib.request.urlopen(req, timeout=60).read()).get("text_output", "")
            say(bool(answer), f"served {dep}: {answer!r}")
            ok &= bool(answer)
        if embeddings:  # the TensorRT encoder between the shared tokenize and pooling models
            from builder.serve.embedding_client import embed_texts

            for p in precisions:
                dep = DeploymentName(EMBEDDING_NAME, p)
                vectors = embed_texts(f"127.0.0.1:{port}", dep.embedding, list(SENTENCES[:2]))
                norms_ok = bool(abs(float((vectors ** 2).sum(axis=1).min()) - 1.0) < 1e-3)
                say(norms_ok, f"served {dep}: {vectors.shape[0]} embeddings of dimension {vectors.shape[1]}, "
                              f"cosine of the first two {float(vectors[0] @ vectors[1]):.4f}")
                ok &= norms_ok
        return ok
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# -- main -------------------------------------------------------------------------------

def dry_run(hf_dir: Path | None, cache_dir: Path) -> None:
    hf_dir = hf_dir or default_checkpoint("llm", cache_dir)
    spec = DeploymentSpec(name=LLM_NAME, precisions=list(tensorrt_llm.GPU_PRECISIONS))
    print(tensorrt_llm.plan_text(spec, hf_dir, Path("gpu-check-repo")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", "-o", type=Path, default=Path("gpu-check-repo"), help="repository to build into")
    ap.add_argument("--cache-dir", type=Path, default=cache_root())
    ap.add_argument("--hf-dir", type=Path, help="LLM checkpoint to check instead of the default model")
    ap.add_argument("--skip-build", action="store_true", help="reuse engines already in --output")
    ap.add_argument("--no-embeddings", action="store_true", help="skip the TensorRT encoder checks")
    ap.add_argument("--serve", action="store_true", help="also serve the repository and ask each deployment")
    ap.add_argument("--dry-run", action="store_true", help="print the LLM build plans and exit (no GPU needed)")
    args = ap.parse_args(argv)
    if args.dry_run:
        dry_run(args.hf_dir, args.cache_dir)
        return 0

    _, precisions = host_report()
    if not precisions:
        return 1
    if not args.skip_build:
        build("llm", precisions, args.output)
        if not args.no_embeddings:
            build("embedding", precisions, args.output)
    ok = True
    hf_dir = args.hf_dir or default_checkpoint("llm", args.cache_dir)
    tok, reference = reference_greedy(hf_dir)
    for p in precisions:
        ok &= llm_accuracy(args.output, p, tok, reference, max_batch=8)
    if not args.no_embeddings:
        batch, ref = reference_embeddings(default_checkpoint("embedding", args.cache_dir))
        for p in precisions:
            ok &= embedding_accuracy(args.output, p, batch, ref)
    if args.serve:
        ok &= serve_and_ask(args.output, precisions, embeddings=not args.no_embeddings)
    say(ok, "all GPU checks passed" if ok else "some GPU checks failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
