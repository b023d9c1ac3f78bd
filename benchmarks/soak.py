"""Soak: 8 mixed clients against a real `serve` for SOAK_SECONDS (default 600), then a report.

Each client loops over a fixed mix: chat completions, streamed chat completions, embeddings, Triton's
own /v2 generate (through the gateway's relay), and
client mistakes (an unknown model, a bad max_tokens, a missing key) whose 4xx is the expected
answer. Every request is checked against what it should get; anything else is an unexpected error
(goal: none). Latency p50/p99 per kind is reported for each time window, and the resident memory of
every process of the serve (serve itself, tritonserver, each Python stub, the gateway, nginx) at
the end of every window after warm-up (goal: under 5% growth; the growth over the second half tells a
leak, which keeps growing, from a cache that fills up).

Warm-up (SOAK_WARMUP, default 300 s) is the same mix from the same clients before the measured
SOAK_SECONDS, its requests checked and counted like the others. It is as long as it is because a
process's memory settles only once it has met the traffic's variety: the LLM engine's working
memory follows the batch compositions it has stepped (how many sequences, how many prompt tokens
at once), and the encoder's the merged batch shapes; both level off (docs/reliability.md, Soak).

Not part of `make test` or `make bench`: `make soak` (SOAK_SECONDS=60 SOAK_WARMUP=30 make soak for a
short run), or `.venv/bin/python -m benchmarks.soak --seconds 60 --warmup 30` from the repository root.
Writes benchmarks/results/soak.json. The default models (SmolLM2 int8, MiniLM int8) are built once
into the cache (build-engines skips unchanged deployments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from builder.build.deployment import DeploymentSpec
from builder.build.pipeline import BuildOptions, build
from builder.paths import cache_root
from tests.support.machine import cpu_description
from tests.support.reliability import cmdline, descendants, rss_bytes
from tests.support.serve import Serve

ROOT = Path(__file__).resolve().parent.parent

LLM, EMBEDDING = "smollm2-135m-instruct:int8", "all-minilm-l6-v2:int8"
CLIENTS = 8
MIX = ("chat", "chat_stream", "embeddings", "chat", "v2_generate", "chat_stream", "embeddings", "bad_model",
       "bad_max_tokens", "no_key")
EXPECTED = {"chat": 200, "chat_stream": 200, "embeddings": 200, "v2_generate": 200, "bad_model": 404,
            "bad_max_tokens": 400, "no_key": 401}
V2_MODEL = LLM.replace(":", "-")         # the deployment's ensemble, Triton's own /v2 API (through the relay)
TOPICS = ("a lighthouse", "tea", "a robot", "Mars", "jazz", "a cat", "an oak tree", "bread")


@dataclass
class Sample:
    at: float          # seconds since the start
    kind: str
    status: int | str  # HTTP status, or the exception's name
    seconds: float
    detail: str = ""


def one_request(client: httpx.Client, url: str, key: str, kind: str, i: int) -> tuple[int | str, str]:
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"model": LLM, "max_tokens": 48, "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % 8]}."}]}
    if kind == "chat":
        r = client.post(f"{url}/v1/chat/completions", json=chat, headers=auth)
        ok = r.status_code != 200 or bool(r.json()["choices"][0]["message"]["content"])
        return (r.status_code if ok else "empty answer"), r.text[:200] if r.status_code != 200 else ""
    if kind == "chat_stream":
        with client.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}, headers=auth) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, r.text[:200]
            lines = [ln for ln in r.iter_lines() if ln]
            events = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
            if lines[-1] != "data: [DONE]" or any("error" in e for e in events):
                return "broken stream", "".join(lines[-2:])[:200]
            return 200, ""
    if kind == "embeddings":
        r = client.post(f"{url}/v1/embeddings", headers=auth,
                        json={"model": EMBEDDING, "input": [f"sentence {i} about {t}" for t in TOPICS]})
        ok = r.status_code != 200 or len(r.json()["data"]) == len(TOPICS)
        return (r.status_code if ok else "wrong count"), r.text[:200] if r.status_code != 200 else ""
    if kind == "v2_generate":
        r = client.post(f"{url}/v2/models/{V2_MODEL}/generate", headers=auth,
                        json={"messages": json.dumps(chat["messages"]), "max_tokens": 48})
        ok = r.status_code != 200 or bool(r.json()["text_output"])
        return (r.status_code if ok else "empty answer"), r.text[:200] if r.status_code != 200 else ""
    if kind == "bad_model":
        r = client.post(f"{url}/v1/chat/completions", json={**chat, "model": "no-such-model:int8"}, headers=auth)
    elif kind == "bad_max_tokens":
        r = client.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": -3}, headers=auth)
    else:
        r = client.post(f"{url}/v1/chat/completions", json=chat)
    return r.status_code, ""


def client_loop(url: str, key: str, index: int, until: float, t0: float, samples: list[Sample]) -> None:
    """Requests from `index` on in the mix until `until`; `at` of each sample counts from `t0`."""
    with httpx.Client(timeout=120) as client:
        i = index
        while time.monotonic() < until:
            kind = MIX[i % len(MIX)]
            start = time.monotonic()
            try:
                status, detail = one_request(client, url, key, kind, i)
            except httpx.HTTPError as e:
                status, detail = type(e).__name__, str(e)[:200]
            samples.append(Sample(start - t0, kind, status, time.monotonic() - start, detail))
            i += 1


def processes(serve_pid: int) -> dict[str, int]:
    """Every process of the serve by a readable name (stubs by their model)."""
    named = {"serve": serve_pid}
    for pid in sorted(descendants(serve_pid)):
        args = cmdline(pid)
        text = " ".join(args)
        if args and args[0].endswith("triton_python_backend_stub"):
            name = "stub " + Path(args[1]).parent.parent.name
        elif "--model-repository" in text:
            name = "tritonserver"
        elif "builder.serve.gateway" in text:
            name = "gateway"
        elif "nginx" in text:
            name = "nginx " + ("master" if "master" in text else "worker")
        else:
            continue
        while name in named:
            name += "'"
        named[name] = pid
    return named


def memory(named: dict[str, int], field: str = "VmRSS") -> dict[str, int]:
    out = {}
    for name, pid in named.items():
        try:
            out[name] = rss_bytes(pid, field)
        except OSError:
            out[name] = 0
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


LATENCY_KINDS = ("chat", "chat_stream", "v2_generate", "embeddings")


def report(samples: list[Sample], seconds: float, window: float, rss: list[dict[str, int]],
           warmup: float = 0.0) -> dict:
    """`samples` from the start of warm-up (`at` < 0 during it); `rss`: every process's resident
    bytes at the end of warm-up and of each window after it; growth is reported from there to the
    end and over the second half (a leak keeps growing there, a cache that fills up does not)."""
    rss_start, rss_middle, rss_end = rss[0], rss[len(rss) // 2], rss[-1]
    unexpected = [s for s in samples if s.status != EXPECTED[s.kind]]
    windows = []
    for w in range(int(warmup // -window), int(seconds // window) + (1 if seconds % window else 0)):
        inside = [s for s in samples if w * window <= s.at < (w + 1) * window and s.status == EXPECTED[s.kind]]
        row = {"from_s": w * window, "requests": len(inside)}     # from_s < 0: warm-up
        for kind in LATENCY_KINDS:
            lat = [s.seconds * 1000 for s in inside if s.kind == kind]
            row[kind] = {"p50_ms": round(percentile(lat, 0.5), 1), "p99_ms": round(percentile(lat, 0.99), 1)}
        windows.append(row)
    growth = {n: round(100.0 * (rss_end.get(n, 0) - v) / v, 2) for n, v in rss_start.items() if v}
    second_half = {n: round(100.0 * (rss_end.get(n, 0) - v) / v, 2) for n, v in rss_middle.items() if v}
    return {
        "machine": cpu_description(), "seconds": seconds, "warmup_seconds": warmup, "clients": CLIENTS,
        "requests": len(samples), "requests_after_warmup": sum(1 for s in samples if s.at >= 0),
        "by_kind": dict(Counter(s.kind for s in samples)),
        "unexpected_errors": len(unexpected),
        "errors_by_kind": {f"{k} -> {v}": n for (k, v), n in Counter((s.kind, s.status) for s in unexpected).items()},
        "unexpected_examples": [s.__dict__ for s in unexpected[:5]],
        "expected_client_errors": {k: n for k, n in Counter(s.kind for s in samples if EXPECTED[s.kind] != 200).items()},
        "windows": windows,
        "rss_mib_after_warmup": {n: round(v / 2**20, 1) for n, v in rss_start.items()},
        "rss_mib_end": {n: round(v / 2**20, 1) for n, v in rss_end.items()},
        "rss_growth_percent": growth,
        "max_rss_growth_percent": max(growth.values(), default=0.0),
        "rss_growth_second_half_percent": second_half,
        "rss_mib_by_window": {n: [round(sample.get(n, 0) / 2**20, 1) for sample in rss] for n in rss_start},
    }


def print_report(r: dict) -> None:
    print(f"\nsoak: {r['requests']} requests in {r['warmup_seconds']:.0f} s of warm-up and {r['seconds']:.0f} s "
          f"after it by {r['clients']} clients on {r['machine']}")
    print(f"unexpected errors: {r['unexpected_errors']}  {r['errors_by_kind'] or ''}")
    print(f"expected client errors (4xx asked for): {r['expected_client_errors']}")
    print(f"{'window':>8} {'requests':>8}  " + "  ".join(f"{k + ' p50/p99 ms':>26}" for k in LATENCY_KINDS))
    for w in r["windows"]:
        cells = "  ".join(f"{w[k]['p50_ms']:>12} / {w[k]['p99_ms']:<11}" for k in LATENCY_KINDS)
        print(f"{w['from_s']:>7.0f}s {w['requests']:>8}  {cells}")
    print("RSS MiB (after warm-up -> end, growth %; growth over the second half):")
    for name, start in r["rss_mib_after_warmup"].items():
        growth, second_half = r["rss_growth_percent"], r["rss_growth_second_half_percent"]
        print(f"  {name:<48} {start:>8} -> {r['rss_mib_end'].get(name, 0):>8}  "
              f"{growth.get(name, 0):+.2f}%   {second_half.get(name, 0):+.2f}%")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600")))
    p.add_argument("--warmup", type=float, default=float(os.environ.get("SOAK_WARMUP", "300")),
                   help="seconds of the same traffic before the measured ones [300]")
    p.add_argument("--window", type=float, default=None, help="report window in seconds [seconds / 10]")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = p.parse_args(argv)
    window = args.window or max(args.seconds / 10, 5.0)
    root = cache_root() / "soak"
    build([DeploymentSpec("smollm2-135m-instruct", precisions=["int8"], context_size=2048, max_batch_size=8),
           DeploymentSpec("all-minilm-l6-v2", kind="embedding", precisions=["int8"])],
          BuildOptions(output=root / "repo", cache_dir=cache_root(), echo=print))
    run = root / f"run-{os.getpid()}"
    run.mkdir(parents=True, exist_ok=True)
    with Serve(root / "repo", run, "--idle-timeout", "0") as serve:
        key = serve.create_key("soak")
        samples: list[Sample] = []
        t0 = time.monotonic() + args.warmup           # the measured time starts after warm-up
        until = t0 + args.seconds
        threads = [threading.Thread(target=client_loop, args=(serve.url, key, i, until, t0, samples))
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(args.warmup)
        named = processes(serve.process.pid)
        rss: list[dict[str, int]] = []
        shared: list[dict[str, int]] = []

        def sample() -> None:
            rss.append(memory(named))
            shared.append(memory(named, "RssShmem"))

        sample()
        while (left := until - time.monotonic()) > 1.0:
            time.sleep(min(window, left))
            sample()
        for t in threads:
            t.join()
        sample()
        result = report(samples, args.seconds, window, rss, args.warmup)
        # how much of it is shared memory (the stubs' regions, touched page by page as tensors of
        # new sizes pass: bounded by the region, not a leak); the rest is each process's own
        result["rss_shmem_mib_by_window"] = {n: [round(x.get(n, 0) / 2**20, 1) for x in shared] for n in shared[0]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    print("of which shared memory, MiB (after warm-up -> end):")
    for name, mib in result["rss_shmem_mib_by_window"].items():
        if mib[-1]:
            print(f"  {name:<48} {mib[0]:>8} -> {mib[-1]:>8}")
    print(f"\nwritten to {args.output}")
    return 0 if result["unexpected_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
