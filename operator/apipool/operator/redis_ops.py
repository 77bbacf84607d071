"""What the operator does in a pool's Redis: publish N, read stats, reap orphans,
and tell whether Redis may evict the pool's keys."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from redis.exceptions import ResponseError

from ..protocol import FinishCode, PoolProtocol
from ..recovery import recover, recovery_step
from ..redis_checks import may_evict, memory_settings
from .spec import PoolSpec

log = logging.getLogger("apipool.operator")


def connect(url: str, timeout: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def pool_protocol(pool: str, spec: PoolSpec) -> PoolProtocol:
    """The pool's atomic steps, bounded by the pool's own limits (envelope size,
    dead-letter list length), as its slots are."""
    return PoolProtocol(
        pool, max_envelope_bytes=spec.max_envelope_bytes, max_dead_letters=spec.max_dead_letters
    )


def orphaned_slots(r: redis.Redis, proto: PoolProtocol, live: set[int]) -> list[int]:
    """Slots with an in-flight list but no pod at all (not even a terminating one)."""
    keys = proto.keys
    found: set[int] = set()
    for key in r.scan_iter(match=keys.inflight_pattern, count=100):
        index = keys.slot_of(key)
        if index is not None and index not in live:
            found.add(index)
    return sorted(found)


def reap(
    r: redis.Redis,
    proto: PoolProtocol,
    slot: int,
    *,
    max_attempts: int,
    result_ttl_seconds: int,
    redact_headers: tuple[str, ...] = (),
) -> int:
    """Return the jobs stranded in a removed slot's in-flight list to the queue
    (attempt + 1, at the front) or dead-letter them after their last attempt.
    Each move is atomic and only happens if the job is still there. An envelope
    over the pool's size limit is dead-lettered unread; the dead-letter list is
    trimmed to the pool's cap."""
    moved = proto.drop_oversize(slot).run(r)  # inside Redis: never sent back by value
    for item in r.lrange(proto.keys.inflight(slot), 0, -1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        outcome = recover(
            raw,
            proto=proto,
            slot=slot,
            max_attempts=max_attempts,
            max_bytes=proto.max_envelope_bytes,
            why="slot removed",
            redact_headers=redact_headers,
        )
        step = recovery_step(proto, slot, raw, outcome, ttl_ms=result_ttl_seconds * 1000)
        if step.run(r).code == FinishCode.DONE:
            moved += 1
    if moved:
        log.info("pool %s: %d job(s) of removed slot %d returned", proto.pool, moved, slot)
    return moved


def eviction_risk(memory: Mapping[str, Any]) -> str | None:
    """From the fields of ``INFO memory``: how Redis may evict keys, or None when
    it never does (the slot's rule, :func:`apipool.redis_checks.may_evict`)."""
    maxmemory, policy = memory_settings(memory)
    if not may_evict(maxmemory, policy):
        return None
    size = f"{maxmemory} bytes" if maxmemory > 0 else "unreadable"
    return f"maxmemory is {size} with maxmemory-policy {policy}"


def read_eviction_risk(r: redis.Redis) -> str | None:
    """:func:`eviction_risk` of this Redis; None when it does not answer ``INFO``
    (a renamed command, an ACL without it): then nothing can be told."""
    try:
        memory = r.info("memory")
    except ResponseError as exc:
        log.debug("INFO memory refused: %s", exc)
        return None
    return eviction_risk(memory)
