"""What the operator does in a pool's Redis: publish N, read stats, reap orphans."""

from __future__ import annotations

import logging
import re

import redis

from ..envelope import DEFAULT_MAX_ENVELOPE_BYTES
from ..layout import COMPLETE_SCRIPT, REQUEUE_SCRIPT, PoolKeys
from ..recovery import recover

log = logging.getLogger("apipool.operator")
INFLIGHT_INDEX = re.compile(rb":inflight:(\d+)$")


def connect(url: str, timeout: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def orphaned_slots(r: redis.Redis, pool: str, live: set[int]) -> list[int]:
    """Slots with an in-flight list but no pod at all (not even a terminating one)."""
    keys = PoolKeys(pool)
    found: list[int] = []
    for key in r.scan_iter(match=keys.inflight_pattern, count=100):
        match = INFLIGHT_INDEX.search(key if isinstance(key, bytes) else key.encode())
        if match and int(match.group(1)) not in live:
            found.append(int(match.group(1)))
    return sorted(found)


def reap(
    r: redis.Redis, pool: str, slot: int, *, max_attempts: int, result_ttl_seconds: int
) -> int:
    """Return the jobs stranded in a removed slot's in-flight list to the queue
    (attempt + 1, at the front) or dead-letter them after their last attempt.
    Each move is atomic and only happens if the job is still there."""
    keys = PoolKeys(pool)
    inflight = keys.inflight(slot)
    complete = r.register_script(COMPLETE_SCRIPT)
    requeue = r.register_script(REQUEUE_SCRIPT)
    moved = 0
    for item in r.lrange(inflight, 0, -1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        outcome = recover(
            raw,
            keys=keys,
            slot=slot,
            max_attempts=max_attempts,
            max_bytes=DEFAULT_MAX_ENVELOPE_BYTES,
            why="slot removed",
        )
        if outcome.retry is not None:
            done = requeue(
                keys=[inflight, keys.queue, keys.stats],
                args=[raw, outcome.retry, "front", "recovered", ""],
            )
        elif outcome.dead is not None:
            dead = outcome.dead
            result_key = dead.reply_to or (keys.result(dead.job_id) if dead.job_id else "")
            done = complete(
                keys=[inflight, result_key, keys.stats, keys.dead, keys.queue],
                args=[raw, dead.record, result_ttl_seconds * 1000, "dead", 0, dead.entry, ""],
            )
        else:
            continue
        if done and int(done[0]) == 1:
            moved += 1
    if moved:
        log.info("pool %s: %d job(s) of removed slot %d returned", pool, moved, slot)
    return moved
