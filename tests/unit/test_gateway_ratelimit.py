"""Per-key sliding-window limits: exact counts, Retry-After when the oldest request leaves."""

from __future__ import annotations

from builder.serve.gateway.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_n_per_minute_then_retry_after_the_oldest_leaves():
    clock = Clock()
    limiter = RateLimiter(clock)
    assert [limiter.hit("k", 3) for _ in range(3)] == [None, None, None]
    clock.now += 20
    assert limiter.hit("k", 3) == 40
    clock.now += 40
    assert limiter.hit("k", 3) is None


def test_no_limit_and_separate_keys():
    limiter = RateLimiter(Clock())
    assert all(limiter.hit("a", None) is None for _ in range(1000))
    assert limiter.hit("b", 1) is None and limiter.hit("b", 1) is not None
    assert limiter.hit("c", 1) is None


def test_no_burst_across_a_minute_boundary():
    clock = Clock()
    limiter = RateLimiter(clock)
    clock.now = 59.0
    assert all(limiter.hit("k", 2) is None for _ in range(2))
    clock.now = 61.0
    assert limiter.hit("k", 2) == 58


def test_a_lowered_limit_applies_at_once():
    clock = Clock()
    limiter = RateLimiter(clock)
    for _ in range(5):
        limiter.hit("k", 10)
    assert limiter.hit("k", 5) == 60


def test_forget_drops_removed_keys():
    limiter = RateLimiter(Clock())
    limiter.hit("gone", 1)
    limiter.forget(set())
    assert limiter.hit("gone", 1) is None
