"""Sampling parameters: validated, never clamped silently, normalized for both engines.

Greedy unless temperature > 0. Greedy is expressed the way TensorRT-LLM and the CPU engine both
read it: top_k = 1. A sampled request without a seed gets a random one, so "no seed" means
"different each time" and a given seed means "the same text each time".
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from backends.errors import RequestError

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Sampling:
    top_k: int = 1          # 0: no limit; 1: greedy
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


def check_sampling(top_k: int | None = None, top_p: float | None = None,
                   temperature: float | None = None, seed: int | None = None) -> Sampling:
    if temperature is not None and not (0.0 <= temperature <= 100.0):
        raise RequestError(f"temperature must be between 0 and 100 (0 = greedy), got {temperature}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise RequestError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise RequestError(f"top_k must be 0 (no limit) or positive, got {top_k}")
    if seed is not None and not (0 <= seed <= MAX_SEED):
        raise RequestError(f"random_seed must be between 0 and {MAX_SEED}, got {seed}")
    if not temperature:  # None or 0: greedy
        return Sampling()
    return Sampling(top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0, temperature=temperature,
                    seed=seed if seed is not None else secrets.randbelow(MAX_SEED))
