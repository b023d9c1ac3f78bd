"""The CPU engine: one openvino-genai ContinuousBatchingPipeline stepped by one thread.

Requests join and leave between steps (in-flight batching): `submit` only enqueues; the stepping
thread adds new requests to the pipeline, advances every live request by one step, hands new
tokens to each request's callback, and cancels requests whose client went away. Nothing here
knows about Triton: the Triton model wraps callbacks around response senders.

Penalties and structured output are openvino-genai's own (GenerationConfig.presence_penalty /
frequency_penalty, StructuredOutputConfig: an xgrammar grammar masks the logits every step). The
grammar is compiled inside `step()`, and a step that raises leaves the pipeline unusable, so
backends.guided refuses what the compiler would refuse before a request gets here; should one slip
through, the step's failure is answered (a 400 for the structured-output requests that had just
joined, "retry" for the others) and the pipeline is built again with the same settings.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backends import file_pages
from backends.cpu_runtime import RUNTIME_CACHE, choose_for_host
from backends.errors import RequestError
from backends.guided import Penalties
from backends.sampling import Sampling

log = logging.getLogger(__name__)

STOP_KEY_TTL = 300.0
# How often each live request asks whether its client cancelled it. In a Triton stub every
# `is_cancelled()` is a round trip to the server process (~73 us measured, per request and step):
# 4% of the engine's time at 8-32 clients when asked every step. A cancel then lands within this.
CANCEL_CHECK_S = 0.1
# At most this many prompt tokens per step (openvino-genai's dynamic split-fuse prefills longer
# prompts over several steps, as vLLM's chunked prefill): a step's scratch memory follows it. The
# default 8k-context int8 SmolLM2 held 914 MB after 8 x 1000-token prompts prefilled in one step,
# 671 MB at 2048 (1024: 635, 512: 615); greedy output is unchanged (tested). 512 and not 2048:
# with the weights released, 475 MiB against 533, and prefill no slower (8 x 1000 tokens 3.4-3.9 s
# against 3.6-3.9 s; one 1900-token prompt 0.88-0.94 s against 0.93-1.03 s); 256 was slower.
PREFILL_CHUNK_TOKENS = 512


@dataclass(frozen=True)
class PromptLookup:
    """Prompt-lookup decoding (openvino-genai's PromptLookupImpl): each step proposes the
    `candidates` tokens that followed the last `ngram` generated tokens where they occur earlier in
    the prompt, and one pass of the model verifies them all, so answers that copy their input
    (summaries, RAG, code edits) take several tokens a step: 2.2x at one client. Greedy output is
    the plain engine's at fp32 (tested); engines with int8 dynamic quantization compute the
    verified tokens in other kernels and may pick the other of two near-tied tokens. Where nothing
    is copied it wastes compute at full batches (0.66x at 8 clients, BENCHMARKS.md). A pipeline
    built for it takes only requests that use it, so it is a per-deployment choice."""
    # 3 candidates a step: measured in-process (int8, 160 new tokens) against 2 and 5, tok/s plain ->
    # 2 / 3 / 5: copying B1 126 -> 232 / 267 / 303, B8 452 -> 590 / 614 / 504; stories B8 694 -> 484 /
    # 399 / 338. 3 keeps most of the one-client gain and costs least where nothing is copied.
    candidates: int = 3        # GenerationConfig.num_assistant_tokens
    ngram: int = 3             # GenerationConfig.max_ngram_size

# on_tokens(new_ids, final, finish_reason): finish_reason is "" until final, then
# stop|length|cancelled (the client went away) |stopped (a `stop` for its key), or error (an engine
# failure: retry) / refused (the request's `refusal` says why)
TokenCallback = Callable[[list[int], bool, str], None]


@dataclass
class GenerationRequest:
    input_ids: list[int]
    max_new_tokens: int
    end_id: int
    sampling: Sampling
    on_tokens: TokenCallback
    stop_sequences: list[list[int]] = field(default_factory=list)
    streaming: bool = False
    is_cancelled: Callable[[], bool] = lambda: False
    key: str = ""       # the client's request id: a later `stop` for the same key ends it
    penalties: Penalties = field(default_factory=Penalties)
    json_schema: str | None = None    # grammar-constrained output following this JSON schema
    refusal: str = ""                 # set by the engine before a final "refused"
    # time.monotonic() stamps the engine sets (metrics): received, joined the batch, first token
    received_at: float = 0.0
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    generated_tokens: int = 0


@dataclass
class _Live:
    request: GenerationRequest
    handle: object
    generated: list[int] = field(default_factory=list)
    sent: int = 0
    fresh: bool = True      # not yet through a successful step
    cancel_checked_at: float = 0.0      # time.monotonic() of the last is_cancelled() asked

    def cancelled(self) -> bool:
        """The client cancelled the request: asked at most every CANCEL_CHECK_S."""
        now = time.monotonic()
        if now - self.cancel_checked_at < CANCEL_CHECK_S:
            return False
        self.cancel_checked_at = now
        return self.request.is_cancelled()


def stop_end(generated: list[int], stops: list[list[int]], new_from: int) -> int:
    """Where the first stop sequence that ends among the tokens from `new_from` on ends (the length
    to keep), or 0. A step adds several tokens under prompt lookup, so one can end mid-step."""
    for end in range(max(new_from, 0) + 1, len(generated) + 1):
        for seq in stops:
            if seq and end >= len(seq) and generated[end - len(seq):end] == seq:
                return end
    return 0


def kv_cache_gib(engine_dir: Path, context_size: int, max_batch_size: int) -> int:
    """KV cache to reserve for max_batch_size full contexts at f32, in whole GiB (at least 1)."""
    cfg = json.loads((Path(engine_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * 4
    return max(1, -(-per_token * context_size * max_batch_size // 2**30))


# on_step(running, waiting): called by the stepping thread after each step (metrics gauges)
StepCallback = Callable[[int, int], None]


class ContinuousBatchingEngine:
    def __init__(self, engine_dir: Path, context_size: int, max_batch_size: int,
                 properties: dict | None = None, cache_gib: int | None = None,
                 on_step: StepCallback | None = None, prompt_lookup: PromptLookup | None = None):
        import openvino as ov
        import openvino_genai as og

        self._ov, self._og = ov, og
        self.context_size = context_size
        scheduler = og.SchedulerConfig()
        scheduler.max_num_seqs = max_batch_size
        # cache_size 0 (and num_kv_blocks 0): the pipeline grows the KV cache as requests need it
        # instead of reserving max_batch_size full contexts; it is bounded by max_batch_size x
        # context_size tokens, which `check` enforces. cache_gib reserves a fixed cache instead.
        scheduler.cache_size = cache_gib or 0
        scheduler.max_num_batched_tokens = min(max(context_size, 256), PREFILL_CHUNK_TOKENS)
        scheduler.dynamic_split_fuse = True
        # Compute and KV cache precision per host (backends/cpu_runtime.py): fp32 runs f32/f32 and
        # stays exact; the others the fastest setting the build measured within their floors on
        # this host's ISA class. `properties` overrides it (benchmarks, tests).
        self.runtime = choose_for_host(engine_dir)
        props = {**RUNTIME_CACHE, **properties} if properties is not None else self.runtime.setting.properties()
        log.info("engine %s: %s (%s, %s)", Path(engine_dir).parent.parent.name, self.runtime.setting.describe(),
                 self.runtime.isa_class, self.runtime.reason)
        self.prompt_lookup = prompt_lookup
        if prompt_lookup is not None:
            props = {**props, "prompt_lookup": True}
        self._pipeline_args = (str(engine_dir), scheduler, "CPU", props)
        self.pipeline = og.ContinuousBatchingPipeline(*self._pipeline_args)
        # the mapped weights, given back once a first answer has run every kernel (file_pages)
        self._weights = Path(engine_dir) / "openvino_model.bin"
        self._weights_released = False
        self.rebuilds = 0
        self.on_step = on_step
        self._queue: queue.Queue[GenerationRequest] = queue.Queue()
        self._stopped_keys: dict[str, float] = {}  # key -> when `stop` arrived
        self._lock = threading.Lock()
        self._live: dict[int, _Live] = {}
        self._next_id = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cb-engine", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------------------------
    def check(self, req: GenerationRequest) -> None:
        """Refuse what the pipeline would choke on, before it is queued."""
        if not req.input_ids:
            raise RequestError("input_ids is empty: send at least one token")
        if req.max_new_tokens < 1:
            raise RequestError(f"request_output_len must be at least 1, got {req.max_new_tokens}")
        if len(req.input_ids) + req.max_new_tokens > self.context_size:
            raise RequestError(
                f"{len(req.input_ids)} input tokens + {req.max_new_tokens} output tokens exceed the "
                f"engine's context size of {self.context_size}")

    def submit(self, req: GenerationRequest) -> None:
        self.check(req)
        if self._stop.is_set():
            raise RequestError("the engine is shutting down: retry on another instance")
        req.received_at = time.monotonic()
        self._queue.put(req)

    def stop(self, key: str) -> None:
        """End the live or queued request with this key (tensorrtllm's `stop` input). A key whose
        request already ended is forgotten after STOP_KEY_TTL seconds."""
        if key:
            now = time.monotonic()
            with self._lock:
                self._stopped_keys[key] = now
                for k in [k for k, t in self._stopped_keys.items() if now - t > STOP_KEY_TTL]:
                    del self._stopped_keys[k]

    def _take_stop(self, key: str) -> bool:
        if not key:
            return False
        with self._lock:
            return self._stopped_keys.pop(key, None) is not None

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def live_requests(self) -> int:
        return len(self._live)

    def cache_usage(self) -> float:
        """Share of the KV cache in use after the last step (0-1), as the pipeline reports it."""
        pipeline = self.pipeline
        return pipeline.get_metrics().cache_usage / 100.0 if pipeline is not None else 0.0

    # -- stepping thread ------------------------------------------------------------------------
    def _config(self, req: GenerationRequest):
        cfg = self._og.GenerationConfig()
        cfg.max_new_tokens = req.max_new_tokens
        single = {s[0] for s in req.stop_sequences if len(s) == 1}
        if req.end_id < 0:  # tensorrtllm's convention: end_id -1 never stops at an end token
            cfg.ignore_eos = True
            if single:
                cfg.stop_token_ids = single
        else:
            cfg.eos_token_id = req.end_id
            cfg.stop_token_ids = {req.end_id} | single
        s = req.sampling
        if s.greedy:
            cfg.do_sample = False
        else:
            cfg.do_sample = True
            cfg.temperature = s.temperature
            cfg.top_k = s.top_k if s.top_k > 0 else 0
            cfg.top_p = s.top_p
            cfg.rng_seed = s.seed
        # openvino-genai moves a generated token's logit toward zero (OpenAI subtracts): the same for
        # the positive logits that compete for the next token, see docs/llm-deployments.md.
        cfg.presence_penalty = req.penalties.presence
        cfg.frequency_penalty = req.penalties.frequency
        if req.json_schema is not None:
            cfg.structured_output_config = self._og.StructuredOutputConfig(json_schema=req.json_schema)
        if self.prompt_lookup is not None:
            cfg.num_assistant_tokens = self.prompt_lookup.candidates
            cfg.max_ngram_size = self.prompt_lookup.ngram
        return cfg

    def _admit(self, block: bool) -> None:
        try:
            req = self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
        except queue.Empty:
            return
        while True:
            rid, self._next_id = self._next_id, self._next_id + 1
            try:
                ids = self._ov.Tensor(np.asarray([req.input_ids], dtype=np.int64))
                handle = self.pipeline.add_request(rid, ids, self._config(req))
                req.admitted_at = time.monotonic()
                self._live[rid] = _Live(req, handle)
            except Exception as e:  # a bad request must not take the engine down
                log.warning("request refused by the pipeline: %s", e)
                self._deliver(req, [], True, "error")
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, req: GenerationRequest, ids: list[int], final: bool, reason: str) -> bool:
        """Call the request's callback; False if the client is gone (sending failed)."""
        try:
            req.on_tokens(ids, final, reason)
            return True
        except Exception as e:
            log.info("response could not be delivered (%s): cancelling", e)
            return False

    def _collect(self, rid: int, live: _Live) -> None:
        og = self._og
        req = live.request
        stopped = self._take_stop(req.key)
        if stopped or live.cancelled():
            live.handle.cancel()
            self._live.pop(rid)
            self._deliver(req, [], True, "stopped" if stopped else "cancelled")
            return
        reason = ""
        before = len(live.generated)
        while live.handle.can_read():
            for out in live.handle.read().values():
                live.generated.extend(out.generated_ids)
                if out.finish_reason == og.GenerationFinishReason.LENGTH:
                    reason = "length"
                elif out.finish_reason == og.GenerationFinishReason.STOP:
                    reason = "stop"
        status = live.handle.get_status()
        end = stop_end(live.generated, req.stop_sequences, before)
        if end:
            if not reason:
                live.handle.cancel()  # a multi-token stop sequence: the pipeline does not know it
            del live.generated[end:]
            reason = "stop"
        req.generated_tokens = len(live.generated)
        if live.generated and not req.first_token_at:
            req.first_token_at = time.monotonic()
        final = bool(reason) or status not in (og.GenerationStatus.RUNNING,)
        if final and not reason:
            reason = "length" if len(live.generated) >= req.max_new_tokens else "stop"
        if req.streaming:
            new = live.generated[live.sent:]
            if new or final:
                live.sent = len(live.generated)
                if not self._deliver(req, new, final, reason if final else ""):
                    live.handle.cancel()
                    final = True
        elif final:
            self._deliver(req, live.generated, True, reason)
        if final:
            self._live.pop(rid, None)
            if not self._weights_released and reason in ("stop", "length"):
                # prefill and decode have run: the CPU plugin holds its own repacked weights now
                file_pages.release(self._weights)
                self._weights_released = True

    def _step_failed(self, error: Exception) -> None:
        """Answer every live request and build the pipeline again: a step that raised leaves it
        unusable ("already in scheduling phase" on every later step). Structured-output requests
        that joined for this step get a 400 with the grammar compiler's reason (its first line,
        without source paths); the others a retryable error."""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = (reason.rsplit(": ", 1)[-1] if ".cc:" in reason else reason).rstrip(". ")
        log.error("pipeline step failed (%s): answering %d request(s) and rebuilding the pipeline",
                  error, len(self._live))
        for rid, live in list(self._live.items()):
            live.handle.cancel()
            req = live.request
            if live.fresh and req.json_schema is not None:
                req.refusal = (f"the JSON schema (guided_decoding_guide) could not be compiled into a grammar: "
                               f"{reason}; simplify the schema")
                self._deliver(req, [], True, "refused")
            else:
                self._deliver(req, [], True, "error")
            self._live.pop(rid)
        self.pipeline = None
        try:
            self.pipeline = self._og.ContinuousBatchingPipeline(*self._pipeline_args)
            self.rebuilds += 1
            self._weights_released = False
        except Exception:
            log.exception("the pipeline could not be built again: the engine stops taking requests")
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._admit(block=not self._live)
            if not self._live:
                continue
            try:
                self.pipeline.step()
            except Exception as e:  # keep serving: fail the live requests, not the engine
                self._step_failed(e)
                continue
            for rid, live in list(self._live.items()):
                live.fresh = False
                self._collect(rid, live)
            if self.on_step is not None:
                try:
                    self.on_step(len(self._live), self._queue.qsize())
                except Exception as e:  # noqa: BLE001 -- an observer must not stop the engine
                    log.warning("on_step failed: %s", e)
        # shutting down: finish every handle so none leaks
        for live in self._live.values():
            live.handle.cancel()
            self._deliver(live.request, [], True, "cancelled")
        self._live.clear()
        while self.pipeline is not None and self.pipeline.has_non_finished_requests():
            self.pipeline.step()
