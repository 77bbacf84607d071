"""What the operator remembers about each pool between reconciles, and for how long.

:class:`PoolStates` owns one :class:`PoolState` per pool: the lock that keeps
the reconciles of a pool from overlapping, whether one more is wanted once the
running one ends (pod events coalesced), and the samples of its busy-time
counter that status.utilization is averaged over. An entry is made when a
reconcile first holds the pool, and removed once the pool is gone (deleted, or
found missing) and nobody holds or waits for it, so that the operator's memory
follows the pools that exist, not every pool it ever saw.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..stats import PoolStats
from .metrics import LedgerTally

PoolKey = tuple[str, str]
"""(namespace, name) of a pool."""

MIN_WINDOW = 5.0
"""Seconds of samples needed before utilization is averaged; before that it is
the busy share at this moment."""


@dataclass
class PoolState:
    """One pool's memory. Its fields are used only while its lock is held."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    busy_samples: deque[tuple[float, int]] = field(default_factory=deque)
    """(monotonic time, the pool's busy_ms counter) of recent reconciles, oldest first."""
    ledger: LedgerTally = field(default_factory=LedgerTally)
    """What apipool_pool_slot_seconds_total counted of the pool's recent minutes."""
    users: int = 0
    """Threads that hold or wait for the lock (guarded by PoolStates)."""
    waiting: int = 0
    """Threads that wait for the lock (guarded by PoolStates)."""
    active: bool = False
    """A reconcile holds the lock and looks at ``dirty`` before it ends
    (guarded by PoolStates)."""
    dirty: bool = False
    """Something changed while the active reconcile ran: it runs once more
    (guarded by PoolStates)."""
    gone: bool = False
    """The pool is gone: drop this entry when the last user leaves."""

    def utilization(self, stats: PoolStats, now: float, window: float) -> float | None:
        """Busy slot-seconds / (N x seconds) over about the last ``window`` seconds,
        from the busy_ms counter; adds this sample. None when the pool has no slots."""
        samples = self.busy_samples
        samples.append((now, stats.counters.get("busy_ms", 0)))
        while len(samples) > 2 and now - samples[1][0] >= window:
            samples.popleft()
        then, busy_then = samples[0]
        if stats.slots <= 0:
            return None
        if now - then < MIN_WINDOW:
            return stats.utilization  # too soon for a window: busy slots right now
        busy = (samples[-1][1] - busy_then) / 1000.0
        return max(0.0, min(1.0, busy / (stats.slots * (now - then))))


class PoolStates:
    """The :class:`PoolState` of every pool this operator tends. Thread-safe.

    Guarantees: at any moment every thread inside :meth:`hold` for one pool
    shares one entry (so one lock: reconciles of a pool never overlap), and an
    entry that :meth:`forget` was called for is gone as soon as no thread holds
    or waits for it.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._states: dict[PoolKey, PoolState] = {}

    @contextmanager
    def hold(self, key: PoolKey) -> Iterator[PoolState]:
        """Wait for the pool's lock and hold it; yields the pool's state."""
        with self._guard:
            state = self._states.setdefault(key, PoolState())
            state.users += 1
            state.waiting += 1
        waited = False
        try:
            with state.lock:
                with self._guard:
                    state.waiting -= 1
                    waited = state.active = True
                yield state
        finally:
            with self._guard:
                if not waited:
                    state.waiting -= 1  # interrupted while waiting for the lock
                elif state.active:  # ended by an error: the next event or tick looks again
                    state.active = state.dirty = False
                state.users -= 1
                if state.gone and state.users == 0 and self._states.get(key) is state:
                    del self._states[key]

    def coalesce(self, key: PoolKey) -> bool:
        """Something of the pool changed: True when the caller should reconcile it;
        False when a reconcile that starts after this moment covers the change (a
        thread waits for the lock), or when the running one is told to run once
        more (``dirty``). So a burst of pod events costs at most one more reconcile."""
        with self._guard:
            state = self._states.get(key)
            if state is None:
                return True
            if state.waiting > 0:
                return False
            if state.active:
                state.dirty = True
                return False
            return True

    def rerun(self, state: PoolState) -> bool:
        """Called by the holder at the end of a reconcile: True (and ``dirty``
        cleared) when it must run once more; else the pool is no longer active."""
        with self._guard:
            if state.dirty:
                state.dirty = False
                return True
            state.active = False
            return False

    def forget(self, key: PoolKey) -> None:
        """The pool is gone: drop its entry now, or when its last holder leaves."""
        with self._guard:
            state = self._states.get(key)
            if state is None:
                return
            state.gone = True
            if state.users == 0:
                del self._states[key]

    def keys(self) -> set[PoolKey]:
        """The pools that have an entry now."""
        with self._guard:
            return set(self._states)

    def __contains__(self, key: object) -> bool:
        with self._guard:
            return key in self._states

    def __len__(self) -> int:
        with self._guard:
            return len(self._states)
