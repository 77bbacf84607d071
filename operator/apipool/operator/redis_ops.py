"""What the operator does in a pool's Redis: publish N, read stats, reap orphans."""

from __future__ import annotations

import logging

import redis

from .. import defaults
from ..protocol import FinishCode, PoolProtocol
from ..recovery import recover, recovery_step

log = logging.getLogger("apipool.operator")


def connect(url: str, timeout: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def orphaned_slots(r: redis.Redis, pool: str, live: set[int]) -> list[int]:
    """Slots with an in-flight list but no pod at all (not even a terminating one)."""
    keys = PoolProtocol(pool).keys
    found: set[int] = set()
    for key in r.scan_iter(match=keys.inflight_pattern, count=100):
        index = keys.slot_of(key)
        if index is not None and index not in live:
            found.add(index)
    return sorted(found)


def reap(
    r: redis.Redis, pool: str, slot: int, *, max_attempts: int, result_ttl_seconds: int
) -> int:
    """Return the jobs stranded in a removed slot's in-flight list to the queue
    (attempt + 1, at the front) or dead-letter them after their last attempt.
    Each move is atomic and only happens if the job is still there."""
    proto = PoolProtocol(pool)
    moved = 0
    for item in r.lrange(proto.keys.inflight(slot), 0, -1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        outcome = recover(
            raw,
            proto=proto,
            slot=slot,
            max_attempts=max_attempts,
            max_bytes=defaults.MAX_ENVELOPE_BYTES,
            why="slot removed",
        )
        step = recovery_step(proto, slot, raw, outcome, ttl_ms=result_ttl_seconds * 1000)
        if step.run(r).code == FinishCode.DONE:
            moved += 1
    if moved:
        log.info("pool %s: %d job(s) of removed slot %d returned", pool, moved, slot)
    return moved
