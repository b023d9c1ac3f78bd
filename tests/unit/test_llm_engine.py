"""The continuous-batching engine without Triton: requests join while others run, stop by key,
cancellation, streaming equals whole output, multi-token stop sequences, refusals."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from conftest import TINY_NAME

from backends.contract.naming import DeploymentName
from backends.errors import RequestError
from backends.llm_engine import ContinuousBatchingEngine, GenerationRequest, PromptLookup, stop_end
from backends.sampling import Sampling

pytestmark = pytest.mark.slow
EOS = 2


@pytest.fixture(scope="module")
def engine(tiny_repository):
    e = ContinuousBatchingEngine(tiny_repository / DeploymentName(TINY_NAME, "fp32").llm_engine / "1" / "engine",
                                 256, 4)
    yield e
    e.shutdown()


class Collector:
    def __init__(self):
        self.chunks: list[list[int]] = []
        self.done = threading.Event()
        self.reason = ""
        self.finished_at = 0.0
        self.request: GenerationRequest | None = None

    def __call__(self, ids, final, reason):
        self.chunks.append(list(ids))
        if final:
            self.reason, self.finished_at = reason, time.monotonic()
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [i for c in self.chunks for i in c]


def wait_tokens(c: Collector, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(c.ids) < n and not c.done.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(c.ids) >= n, f"got {c.ids} ({c.reason or 'not finished'})"


def submit(engine, ids, n, **kw) -> Collector:
    c = Collector()
    c.request = GenerationRequest(ids, n, kw.pop("end_id", EOS), Sampling(), c, **kw)
    engine.submit(c.request)
    return c


def test_requests_join_while_another_runs(engine):
    long = submit(engine, [10, 11, 12], 200, streaming=True, end_id=-1)
    wait_tokens(long, 5)
    short = submit(engine, [20, 21], 5, end_id=-1)
    assert short.done.wait(60) and long.done.wait(120)
    assert len(short.ids) == 5 and len(long.ids) == 200
    assert short.finished_at < long.finished_at, "the short request waited for the long one: not in-flight"
    assert engine.live_requests == 0


def test_streaming_chunks_equal_the_whole_output(engine):
    whole = submit(engine, [5, 6, 7, 8], 40, end_id=-1)
    streamed = submit(engine, [5, 6, 7, 8], 40, streaming=True, end_id=-1)
    assert whole.done.wait(60) and streamed.done.wait(60)
    assert len(streamed.chunks) > 5 and streamed.ids == whole.ids and whole.reason == "length"


def test_stop_by_key_and_client_cancellation(engine, monkeypatch):
    monkeypatch.setattr("backends.llm_engine.CANCEL_CHECK_S", 0.0)   # the tiny model outruns 0.1 s
    stopped = submit(engine, [1, 2, 3], 200, streaming=True, end_id=-1, key="req-1")
    wait_tokens(stopped, 3)
    engine.stop("req-1")
    assert stopped.done.wait(30) and stopped.reason == "stopped" and len(stopped.ids) < 200
    gone = threading.Event()
    cancelled = submit(engine, [1, 2, 3], 200, streaming=True, end_id=-1, is_cancelled=gone.is_set)
    wait_tokens(cancelled, 3)
    gone.set()
    assert cancelled.done.wait(30) and cancelled.reason == "cancelled"
    assert engine.live_requests == 0


def test_cancellation_is_asked_at_most_every_interval(engine):
    """In a stub every is_cancelled() is a round trip to Triton: asked at most every
    CANCEL_CHECK_S per request, not on each of the hundreds of steps."""
    from backends.llm_engine import CANCEL_CHECK_S

    asked = []
    done = submit(engine, [7, 8, 9], 200, end_id=-1, is_cancelled=lambda: asked.append(time.monotonic()) or False)
    assert done.done.wait(120) and done.reason == "length" and len(done.ids) == 200
    assert asked, "cancellation was never asked"
    took = done.finished_at - done.request.admitted_at
    assert len(asked) <= took / CANCEL_CHECK_S + 2, (len(asked), took)
    assert all(b - a >= CANCEL_CHECK_S for a, b in itertools.pairwise(asked))


def test_a_prompt_longer_than_one_prefill_chunk_gives_the_same_answer(engine, tiny_repository, monkeypatch):
    """Prompts are prefilled in chunks of at most PREFILL_CHUNK_TOKENS (the scratch memory of a
    step follows it): a prompt split over several steps is answered as one prefilled at once."""
    monkeypatch.setattr("backends.llm_engine.PREFILL_CHUNK_TOKENS", 64)
    chunked = ContinuousBatchingEngine(
        tiny_repository / DeploymentName(TINY_NAME, "fp32").llm_engine / "1" / "engine", 256, 4)
    try:
        assert chunked._pipeline_args[1].max_num_batched_tokens == 64       # the scheduler it was built with
        prompt = [(i * 37) % 200 + 3 for i in range(200)]       # > 3 chunks of 64
        whole, split = submit(engine, prompt, 24, end_id=-1), submit(chunked, prompt, 24, end_id=-1)
        assert whole.done.wait(60) and split.done.wait(60)
        assert len(split.ids) == 24 and split.ids == whole.ids
    finally:
        chunked.shutdown()


def test_the_mapped_weights_are_given_back_after_the_first_answer(tiny_repository, tmp_path):
    """Once a first answer has run every kernel, the CPU plugin works from its own repacked
    weights: the memory-mapped file's pages are given back (backends/file_pages.py), and the
    engine keeps answering the same. A private copy: the module's other engines map the original."""
    import shutil

    from backends import file_pages

    engine_dir = tmp_path / "engine"
    shutil.copytree(tiny_repository / DeploymentName(TINY_NAME, "fp32").llm_engine / "1" / "engine", engine_dir)
    weights = engine_dir / "openvino_model.bin"
    fresh = ContinuousBatchingEngine(engine_dir, 256, 4)
    try:
        first = submit(fresh, [9, 10, 11], 12, end_id=-1)
        assert first.done.wait(60)
        deadline = time.monotonic() + 10
        while not fresh._weights_released and time.monotonic() < deadline:   # set once released
            time.sleep(0.01)
        assert weights.stat().st_size > 1 << 20
        assert file_pages.resident_bytes(weights) < weights.stat().st_size // 4
        again = submit(fresh, [9, 10, 11], 12, end_id=-1)
        assert again.done.wait(60) and again.ids == first.ids
    finally:
        fresh.shutdown()


def test_timestamps_for_metrics(engine):
    done = submit(engine, [4, 5, 6], 6, end_id=-1)
    assert done.done.wait(60)
    r = done.request
    assert 0 < r.received_at <= r.admitted_at <= r.first_token_at and r.generated_tokens == 6


def test_multi_token_stop_sequence_ends_generation(engine):
    free = submit(engine, [30, 31, 32], 30, end_id=-1)
    assert free.done.wait(60)
    stop = free.ids[10:12]
    first = next(i for i in range(len(free.ids) - 1) if free.ids[i:i + 2] == stop)
    stopped = submit(engine, [30, 31, 32], 30, end_id=-1, stop_sequences=[stop])
    assert stopped.done.wait(60)
    assert stopped.ids == free.ids[:first + 2] and stopped.reason == "stop"


@pytest.mark.parametrize("ids,n,match", [([], 4, "empty"), ([1, 2], 0, "at least 1"), ([1] * 200, 100, "context")])
def test_refusals(engine, ids, n, match):
    with pytest.raises(RequestError, match=match):
        submit(engine, ids, n)


# -- prompt-lookup decoding -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lookup_engine(tiny_repository):
    e = ContinuousBatchingEngine(tiny_repository / DeploymentName(TINY_NAME, "fp32").llm_engine / "1" / "engine",
                                 256, 4, prompt_lookup=PromptLookup())
    yield e
    e.shutdown()


def test_prompt_lookup_keeps_greedy_output(engine, lookup_engine):
    """(That it takes several tokens a step where the answer copies the prompt needs a real model:
    tests/integration/test_prompt_lookup.py.)"""
    start = [40, 41, 42, 43] * 3
    plain = submit(engine, start, 48, end_id=-1)
    assert plain.done.wait(60)
    prompt = start + plain.ids + start
    again = submit(engine, prompt, 48, end_id=-1, streaming=True)
    looked = submit(lookup_engine, prompt, 48, end_id=-1, streaming=True)
    assert again.done.wait(60) and looked.done.wait(60)
    assert looked.ids == again.ids and looked.reason == again.reason == "length"


def test_prompt_lookup_stops_and_cancels_like_the_plain_engine(lookup_engine):
    stopped = submit(lookup_engine, [1, 2, 3], 200, streaming=True, end_id=-1, key="pl-1")
    wait_tokens(stopped, 3)
    lookup_engine.stop("pl-1")
    assert stopped.done.wait(30) and stopped.reason == "stopped" and len(stopped.ids) < 200
    whole = submit(lookup_engine, [7, 8, 9], 20, end_id=-1)
    assert whole.done.wait(60) and len(whole.ids) == 20 and lookup_engine.live_requests == 0


def test_a_stop_sequence_that_ends_inside_a_step_of_several_tokens_is_found_where_it_ends():
    assert stop_end([1, 2, 3, 4, 5, 6], [[3, 4]], new_from=2) == 4            # inside the new tokens
    assert stop_end([1, 2, 3, 4, 5, 6], [[2, 3]], new_from=2) == 3            # across old and new
    assert stop_end([1, 2, 3, 4, 5, 6], [[1, 2]], new_from=2) == 0            # ended before: seen then
    assert stop_end([1, 2, 3, 4, 5, 6], [[5, 6], [3]], new_from=2) == 3       # the first one to end wins
    assert stop_end([1, 2], [[]], new_from=0) == 0


def test_prompt_lookup_serves_sampled_and_penalized_requests(lookup_engine):
    from backends.guided import Penalties
    sampled = Collector()
    sampled.request = GenerationRequest([7, 8, 9], 20, -1, Sampling(top_k=20, top_p=0.9, temperature=0.8, seed=3),
                                        sampled, penalties=Penalties(0.5, 0.5))
    lookup_engine.submit(sampled.request)
    assert sampled.done.wait(60) and sampled.reason == "length" and len(sampled.ids) == 20
