"""Reading a pool's state from Redis: queue depth, in-flight per slot, counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from redis.exceptions import RedisError

from .errors import RedisUnavailable
from .layout import PoolKeys
from .protocol import Outcome

COUNTERS = ("submitted", *(o.value for o in Outcome), "busy_ms", "dead_trimmed")
"""The counters of a pool's stats hash: submissions, one per outcome, handler time,
dead letters trimmed off the capped list."""


@dataclass(frozen=True)
class PoolStats:
    pool: str
    slots: int
    """N as configured by the supervisor or operator (0 when unknown)."""
    queued: int
    inflight: dict[int, int]
    """Jobs in flight per slot index (slots 0..N-1 and any other holding work)."""
    leases: dict[int, str]
    """Current lease holder per slot."""
    dead_letters: int
    counters: dict[str, int] = field(default_factory=dict)
    max_queue_length: int = 0

    @property
    def busy(self) -> int:
        return sum(1 for n in self.inflight.values() if n > 0)

    @property
    def utilization(self) -> float | None:
        """Busy slots / N right now."""
        return self.busy / self.slots if self.slots else None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["busy"] = self.busy
        doc["utilization"] = self.utilization
        return doc


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def write_pool_config(r: redis.Redis, pool: str, *, slots: int, max_queue_length: int = 0) -> None:
    """Publish N and the queue bound for producers and stats."""
    keys = PoolKeys(pool)
    try:
        r.hset(keys.config, mapping={"slots": slots, "max_queue_length": max_queue_length})
    except RedisError as exc:
        raise RedisUnavailable(f"writing the config of pool {pool!r} failed: {exc}") from exc


def read_stats(r: redis.Redis, pool: str, *, slots: int | None = None) -> PoolStats:
    keys = PoolKeys(pool)
    try:
        config = {_text(k): _text(v) for k, v in r.hgetall(keys.config).items()}
        n = slots if slots is not None else int(config.get("slots", 0))
        pipe = r.pipeline(transaction=False)
        pipe.llen(keys.queue)
        pipe.llen(keys.dead)
        pipe.hgetall(keys.stats)
        for i in range(n):
            pipe.llen(keys.inflight(i))
            pipe.get(keys.lease(i))
        answers = pipe.execute()
    except RedisError as exc:
        raise RedisUnavailable(f"reading pool {pool!r} from Redis failed: {exc}") from exc
    queued, dead, raw_counters = answers[0], answers[1], answers[2]
    inflight: dict[int, int] = {}
    leases: dict[int, str] = {}
    for i in range(n):
        inflight[i] = int(answers[3 + 2 * i])
        holder = answers[4 + 2 * i]
        if holder is not None:
            leases[i] = _text(holder)
    counters = {name: 0 for name in COUNTERS}
    counters.update({_text(k): int(float(v)) for k, v in raw_counters.items()})
    return PoolStats(
        pool=pool,
        slots=n,
        queued=int(queued),
        inflight=inflight,
        leases=leases,
        dead_letters=int(dead),
        counters=counters,
        max_queue_length=int(config.get("max_queue_length", 0)),
    )
