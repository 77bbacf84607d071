"""The operator's Prometheus metrics of each pool (labels ``namespace``, ``pool``).

Gauges, set at each reconcile: ``apipool_pool_slots`` (N),
``apipool_pool_ready_slots``, ``apipool_pool_effective_slots``,
``apipool_pool_queue_length``, ``apipool_pool_dead_letters`` and
``apipool_pool_utilization`` (the status's figure); they are removed when the
pool goes, and not set while the pool's Redis cannot be read.

``apipool_pool_slot_seconds_total{state}`` counts the pool's slot-seconds from
its ledger (ledger.py): the states as the slots write them, and ``down`` once a
minute is over (:data:`CLOSE_AFTER` seconds past its end, so that the slots'
last writes are in). :class:`LedgerTally` remembers what was counted of each
recent minute, so a second is counted once however often the ledger is read.
Seconds a slot writes later than that (after a Redis outage) are still counted
in their state, and were already counted as ``down``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from ..layout import LEDGER_BUCKET_SECONDS
from ..ledger import LOSSES, SlotSeconds
from ..slot_time import STATES
from ..stats import PoolStats

CLOSE_AFTER = 15.0
"""Seconds after a minute ends before its ``down`` is counted."""
TALLY_SECONDS = 300.0
"""How far back each reconcile reads the ledger for the counter (a reconcile
runs at least every ``APIPOOL_TIMER_INTERVAL``, 10 s by default)."""

LABELS = ["namespace", "pool"]


def _gauge(name: str, text: str) -> Gauge:
    return Gauge(name, text, LABELS)


SLOTS = _gauge("apipool_pool_slots", "N: the pool's slots (spec.slots)")
READY = _gauge("apipool_pool_ready_slots", "Slot pods that are ready")
EFFECTIVE = _gauge(
    "apipool_pool_effective_slots", "The pool's effective concurrency (N unless the API refuses)"
)
QUEUE = _gauge("apipool_pool_queue_length", "Jobs waiting in the pool's queue")
DEAD = _gauge("apipool_pool_dead_letters", "Entries in the pool's dead-letter list")
UTILIZATION = _gauge(
    "apipool_pool_utilization",
    "Share of N x wall time spent calling over the status window (status.utilization)",
)
SLOT_SECONDS = Counter(
    "apipool_pool_slot_seconds",
    "The pool's slot-seconds by state, from its ledger (down: no live slot process)",
    [*LABELS, "state"],
)
GAUGES = (SLOTS, READY, EFFECTIVE, QUEUE, DEAD, UTILIZATION)


@dataclass
class LedgerTally:
    """What :data:`SLOT_SECONDS` has counted of each recent minute of one pool."""

    counted: dict[int, dict[str, float]] = field(default_factory=dict)

    def increments(self, minutes: Sequence[SlotSeconds], now: float) -> dict[str, float]:
        """Seconds per state (and ``down``) not counted yet; remembers them."""
        step = LEDGER_BUCKET_SECONDS
        out: dict[str, float] = {}
        for one in minutes:
            minute = int(one.since // step)
            done = self.counted.setdefault(minute, {})
            values = dict(one.states)
            if now >= (minute + 1) * step + CLOSE_AFTER:
                values["down"] = one.down
            for state, seconds in values.items():
                extra = seconds - done.get(state, 0.0)
                if extra > 0:
                    out[state] = out.get(state, 0.0) + extra
                    done[state] = seconds
        oldest = int((now - 2 * TALLY_SECONDS) // step)
        for minute in [m for m in self.counted if m < oldest]:
            del self.counted[minute]
        return out


def count_seconds(namespace: str, pool: str, increments: dict[str, float]) -> None:
    for state, seconds in increments.items():
        SLOT_SECONDS.labels(namespace, pool, state).inc(seconds)


def export(
    namespace: str,
    pool: str,
    *,
    slots: int,
    ready: int,
    stats: PoolStats | None,
    utilization: float | None,
) -> None:
    """Set the pool's gauges (the Redis figures only when Redis was read)."""
    SLOTS.labels(namespace, pool).set(slots)
    READY.labels(namespace, pool).set(ready)
    for state in (*STATES, *LOSSES):
        SLOT_SECONDS.labels(namespace, pool, state)  # every series from the start, at 0
    if stats is None:
        return
    EFFECTIVE.labels(namespace, pool).set(
        stats.effective_slots if stats.effective_slots is not None else slots
    )
    QUEUE.labels(namespace, pool).set(stats.queued)
    DEAD.labels(namespace, pool).set(stats.dead_letters)
    if utilization is not None:
        UTILIZATION.labels(namespace, pool).set(utilization)


def forget(namespace: str, pool: str) -> None:
    """The pool is gone: drop its series."""
    for gauge in GAUGES:
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, pool)
    for state in {*STATES, *LOSSES}:
        with contextlib.suppress(KeyError):
            SLOT_SECONDS.remove(namespace, pool, state)
