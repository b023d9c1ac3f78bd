"""Backpressure: how many requests a deployment takes at once before it answers 429.

A deployment's engine runs `max_batch_size` requests together (in-flight batching) and holds the
rest in its own queue; past `max_batch_size + queue` the gateway refuses at once (429 with
Retry-After) instead of letting requests pile up in memory and time out. The queue defaults to
twice the batch (`DEFAULT_QUEUE_FACTOR`): one batch finishing while the next waits, a little
slack for the one after. serve --max-queue sets it for every deployment, a deployment file's
`[[models]] max_queue` for one name. docs/reliability.md has the measurements.
"""

from __future__ import annotations

DEFAULT_QUEUE_FACTOR = 2
DEFAULT_BATCH = 8          # a deployment whose manifest does not say (older builds)


def in_flight_bound(max_batch_size: int | None, queue: int | None) -> int:
    """max_batch_size + queue; queue None: DEFAULT_QUEUE_FACTOR x max_batch_size; queue < 0: no bound (0)."""
    batch = max_batch_size or DEFAULT_BATCH
    if queue is None:
        queue = DEFAULT_QUEUE_FACTOR * batch
    return 0 if queue < 0 else batch + queue


def queue_for(name: str, deployment_id: str, default: int | None, by_name: dict[str, int]) -> int | None:
    """A deployment's queue: its own (by name:precision, then name), else the serve-wide one."""
    return by_name.get(deployment_id, by_name.get(name, default))
