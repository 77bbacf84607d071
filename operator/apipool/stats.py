"""Reading a pool's state from Redis: queue depth, in-flight per slot, counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from redis.exceptions import RedisError

from .errors import RedisUnavailable
from .layout import PoolKeys
from .protocol import Outcome

COUNTERS = (
    "submitted",
    *(o.value for o in Outcome),
    "busy_ms",
    "dead_trimmed",
    "cancelled",
    "expired_unread",
)
"""The counters of a pool's stats hash: submissions, one per outcome, handler time,
dead letters trimmed off the capped list, jobs removed from the queue by
``Client.cancel``, ``ok`` results that expired before anyone read them."""


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
    """Entries in the dead-letter list now (capped at the slots' ``max_dead_letters``)."""
    counters: dict[str, int] = field(default_factory=dict)
    """Every name of :data:`COUNTERS` (0 when never counted), and any other the
    stats hash holds: ``dead_trimmed`` counts dead letters dropped off the capped list."""
    max_queue_length: int = 0
    effective_slots: int | None = None
    """The pool's effective concurrency (below N while the API refuses calls);
    None when N is unknown. Equal to ``slots`` when the pool runs at N."""
    paused_until: float | None = None
    """Unix time the pool's Retry-After pause ends; None when it is not paused."""

    @property
    def dead_trimmed(self) -> int:
        """Dead letters dropped off the capped list so far (they are counted in ``dead``)."""
        return self.counters.get("dead_trimmed", 0)

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
        doc["dead_trimmed"] = self.dead_trimmed
        return doc


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _counters(raw: dict[bytes, bytes]) -> dict[str, int]:
    """The stats hash as numbers; a field that is not a number (written by hand) is left out."""
    counters: dict[str, int] = {}
    for key, value in raw.items():
        try:
            counters[_text(key)] = int(float(value))
        except (TypeError, ValueError, OverflowError):
            continue
    return counters


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
        pipe.get(keys.effective)
        pipe.get(keys.pause)
        for i in range(n):
            pipe.llen(keys.inflight(i))
            pipe.get(keys.lease(i))
        answers = pipe.execute()
    except RedisError as exc:
        raise RedisUnavailable(f"reading pool {pool!r} from Redis failed: {exc}") from exc
    queued, dead, raw_counters, effective, paused = answers[:5]
    inflight: dict[int, int] = {}
    leases: dict[int, str] = {}
    for i in range(n):
        inflight[i] = int(answers[5 + 2 * i])
        holder = answers[6 + 2 * i]
        if holder is not None:
            leases[i] = _text(holder)
    counters = {name: 0 for name in COUNTERS}
    counters.update(_counters(raw_counters))
    return PoolStats(
        pool=pool,
        slots=n,
        queued=int(queued),
        inflight=inflight,
        leases=leases,
        dead_letters=int(dead),
        counters=counters,
        max_queue_length=int(config.get("max_queue_length", 0)),
        effective_slots=_effective(effective, n),
        paused_until=_number_or_none(paused),
    )


def _number_or_none(raw: bytes | str | None) -> float | None:
    try:
        return None if raw is None else float(_text(raw))
    except ValueError:
        return None


def _effective(raw: bytes | str | None, slots: int) -> int | None:
    """The effective concurrency: the key's value, capped at N (absent: N)."""
    if slots <= 0:
        return None
    value = _number_or_none(raw)
    return slots if value is None else max(0, min(slots, int(value)))
