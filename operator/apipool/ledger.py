"""The pool's ledger: where every slot-second went, per minute (LEDGER in layout.py).

Each slot adds the seconds it spent in each state of
:data:`~apipool.slot_time.STATES` to the bucket of the minute they fell in
(:func:`by_minute` splits a heartbeat's seconds at minute boundaries). A
reader (:func:`read_ledger`) sums the buckets of a time range into a
:class:`SlotSeconds`:

- ``capacity`` = N x the seconds each bucket covers (a past minute: 60 s; the
  current one: up to now), N being the bucket's ``slots``;
- ``down`` = capacity - the sum of the states: the seconds no live slot
  process accounted for (a slot index with no process, a process still
  importing, the seconds a killed slot had not written yet). It is never
  negative: should the states exceed the capacity (N lowered within a
  minute, clocks of two machines apart), ``down`` is 0 and the excess is left
  in the states;
- ``utilization`` = calling / capacity: the share of paid capacity used.

The bucket holding "now" lags by up to one heartbeat interval (each slot writes
at its heartbeat), so its latest second shows as ``down`` until the next write.
Buckets before the first one written in the range are not counted: the pool
did not exist or nobody ran it, and nothing was paid for.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import RedisError

from .errors import RedisUnavailable
from .layout import LEDGER_BUCKET_SECONDS, PoolKeys
from .slot_time import STATES

Buckets = dict[int, dict[str, float]]
"""``{minute: {state: seconds}}`` (minute = unix time // 60)."""

LOSSES = (*(s for s in STATES if s != "calling"), "down")
"""Every cause of capacity not used for calling, in report order."""


def by_minute(deltas: Mapping[str, float], end: float) -> Buckets:
    """Seconds per state that ended at wall time ``end`` (unix seconds), split
    over the minutes they span in proportion to the time in each minute (the
    last minute gets the remainder: every second lands in exactly one)."""
    step = LEDGER_BUCKET_SECONDS
    total = sum(deltas.values())
    if total <= 0:
        return {}
    start = end - total
    first = int(start // step)
    last = max(first, math.ceil(end / step) - 1)
    out: Buckets = {}
    given = dict.fromkeys(deltas, 0.0)
    for minute in range(first, last):
        share = (min(end, (minute + 1) * step) - max(start, minute * step)) / total
        out[minute] = {state: seconds * share for state, seconds in deltas.items()}
        for state, seconds in out[minute].items():
            given[state] += seconds
    out[last] = {state: seconds - given[state] for state, seconds in deltas.items()}
    return out


def merge_buckets(into: Buckets, more: Mapping[int, Mapping[str, float]]) -> None:
    """Add ``more`` to ``into`` in place."""
    for minute, states in more.items():
        bucket = into.setdefault(minute, {})
        for state, seconds in states.items():
            bucket[state] = bucket.get(state, 0.0) + seconds


@dataclass(frozen=True)
class SlotSeconds:
    """Where the pool's slot-seconds went over ``since`` .. ``until`` (unix seconds)."""

    pool: str
    since: float
    """Start of the first bucket counted (a minute boundary)."""
    until: float
    slots: int
    """N in the latest bucket counted (0 when nothing was counted)."""
    capacity: float
    """Paid slot-seconds: N x the wall seconds covered, summed over the buckets."""
    states: dict[str, float] = field(default_factory=dict)
    """Seconds per state of :data:`~apipool.slot_time.STATES`, summed over the slots."""

    @property
    def accounted(self) -> float:
        return sum(self.states.values())

    @property
    def down(self) -> float:
        """Capacity no live slot accounted for; never negative (see the module)."""
        return max(0.0, self.capacity - self.accounted)

    @property
    def utilization(self) -> float | None:
        """calling / capacity; None when there is no capacity to speak of."""
        return self.states.get("calling", 0.0) / self.capacity if self.capacity > 0 else None

    @property
    def losses(self) -> dict[str, float]:
        """Seconds of capacity not used for calling, per cause (``down`` included)."""
        lost = {cause: self.states.get(cause, 0.0) for cause in LOSSES if cause != "down"}
        lost["down"] = self.down
        return lost

    @property
    def largest_loss(self) -> tuple[str, float] | None:
        """(cause, share of capacity) of the largest loss; None when nothing was lost."""
        cause, seconds = max(self.losses.items(), key=lambda item: item[1])
        if seconds <= 0 or self.capacity <= 0:
            return None
        return cause, seconds / self.capacity

    def to_dict(self) -> dict[str, Any]:
        largest = self.largest_loss
        return {
            "pool": self.pool,
            "since": self.since,
            "until": self.until,
            "slots": self.slots,
            "capacity_seconds": self.capacity,
            "states": dict(self.states),
            "down": self.down,
            "utilization": self.utilization,
            "largest_loss": None if largest is None else {"cause": largest[0], "share": largest[1]},
        }


def _number(value: Any) -> float:
    try:
        return float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError, UnicodeDecodeError):
        return 0.0


def _key(key: bytes | str) -> str:
    return key.decode(errors="replace") if isinstance(key, bytes) else key


def per_minute(
    pool: str,
    buckets: Mapping[int, Mapping[bytes | str, Any]],
    *,
    since: float,
    until: float,
    slots_now: int,
) -> list[SlotSeconds]:
    """Pure: one :class:`SlotSeconds` per minute ``since // 60 .. until // 60``,
    from the first bucket written on (``slots_now``: N for a bucket no slot wrote)."""
    step = LEDGER_BUCKET_SECONDS
    out: list[SlotSeconds] = []
    for minute in range(int(since // step), int(until // step) + 1):
        raw = {_key(k): v for k, v in buckets.get(minute, {}).items()}
        if not raw and not out:
            continue  # before the first write: nothing was paid for
        slots = int(_number(raw["slots"])) if "slots" in raw else slots_now
        start = float(minute * step)
        end = min(until, start + step)
        states: dict[str, float] = {state: _number(raw.get(state, 0.0)) for state in STATES}
        out.append(SlotSeconds(pool, start, end, slots, slots * max(0.0, end - start), states))
    return out


def combine(pool: str, minutes: Sequence[SlotSeconds], *, until: float) -> SlotSeconds:
    """Pure: the sum of consecutive minutes (N: the latest minute's)."""
    states: dict[str, float] = dict.fromkeys(STATES, 0.0)
    for one in minutes:
        for state, seconds in one.states.items():
            states[state] += seconds
    return SlotSeconds(
        pool=pool,
        since=minutes[0].since if minutes else until,
        until=until,
        slots=minutes[-1].slots if minutes else 0,
        capacity=sum(one.capacity for one in minutes),
        states=states,
    )


def summarize(
    pool: str,
    buckets: Mapping[int, Mapping[bytes | str, Any]],
    *,
    since: float,
    until: float,
    slots_now: int,
) -> SlotSeconds:
    """Pure: the buckets read for minutes ``since // 60 .. until // 60`` summed
    (``slots_now``: N for a bucket no slot wrote, after the first one that was)."""
    minutes = per_minute(pool, buckets, since=since, until=until, slots_now=slots_now)
    return combine(pool, minutes, until=until)


def read_minutes(
    r: redis.Redis, pool: str, *, seconds: float, now: float | None = None
) -> list[SlotSeconds]:
    """:func:`per_minute` of the pool's ledger over the last ``seconds`` up to ``now``."""
    until = time.time() if now is None else now
    since = until - seconds
    keys = PoolKeys(pool)
    step = LEDGER_BUCKET_SECONDS
    minutes = list(range(int(since // step), int(until // step) + 1))
    try:
        pipe = r.pipeline(transaction=False)
        pipe.hgetall(keys.config)  # HGETALL: what every role's ACL grants
        for minute in minutes:
            pipe.hgetall(keys.ledger(minute))
        answers = pipe.execute()
    except RedisError as exc:
        raise RedisUnavailable(f"reading the ledger of pool {pool!r} failed: {exc}") from exc
    slots_now = int(_number(answers[0].get(b"slots", answers[0].get("slots", 0))))
    buckets = dict(zip(minutes, answers[1:], strict=True))
    return per_minute(pool, buckets, since=since, until=until, slots_now=slots_now)


def read_ledger(
    r: redis.Redis, pool: str, *, seconds: float, now: float | None = None
) -> SlotSeconds:
    """Where the pool's slot-seconds went over the last ``seconds`` up to ``now``
    (whole minutes: the first bucket is counted from its start)."""
    until = time.time() if now is None else now
    return combine(pool, read_minutes(r, pool, seconds=seconds, now=until), until=until)
