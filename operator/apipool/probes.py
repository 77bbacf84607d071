"""What a slot's ``/healthz`` and ``/readyz`` answer, and the call state they read.

Both verdicts are pure functions of a few numbers, so they are tested without
a process; :class:`CallTracker` owns the one piece of state only the probes
need: when the handler call in progress (if any) started.

- liveness (``/healthz``) fails when the process should be killed and
  replaced: its heartbeat loop stalled, or a call ran past its timeout plus
  ``health_grace`` (a handler that ignores cancellation);
- readiness (``/readyz``) fails while the slot cannot call the API: Redis is
  unreachable, Redis refuses the slot's steps (a permanent error) or may evict
  keys, the slot is beyond the pool's size, or it holds no valid lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .settings import Timings
from .slot_time import SlotTime, State

Verdict = tuple[bool, str]
"""(ok, reason): reason is ``"ok"`` when ok, else says what is wrong."""

OK: Verdict = (True, "ok")


class CallTracker:
    """When the handler call in progress started; at most one call at a time.
    Given the slot's :class:`~apipool.slot_time.SlotTime`, a call's time is
    booked to ``calling``, and back to the state it found when it finishes."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, slot_time: SlotTime | None = None
    ) -> None:
        self._clock = clock
        self._started: float | None = None
        self.slot_time = slot_time
        self._before: State | None = None

    @property
    def running(self) -> bool:
        return self._started is not None

    def start(self) -> float:
        """Mark a call as started now; returns the start time (on the clock)."""
        if self._started is not None:
            raise RuntimeError("a call is already running in this slot")
        self._started = self._clock()
        if self.slot_time is not None:
            self._before = self.slot_time.enter("calling")
        return self._started

    def finish(self) -> float:
        """Mark the call as over; returns how many seconds it ran."""
        if self._started is None:
            raise RuntimeError("no call is running")
        ran = max(0.0, self._clock() - self._started)
        self._started = None
        if self.slot_time is not None and self._before is not None:
            self.slot_time.enter(self._before)
            self._before = None
        return ran

    def running_for(self) -> float | None:
        """Seconds the call in progress has run, None when there is none."""
        return None if self._started is None else self._clock() - self._started


def heartbeat_stall_limit(timings: Timings) -> float:
    """Seconds without a heartbeat tick after which the slot counts as stalled."""
    return 3 * timings.heartbeat_interval + 1.0


def liveness(timings: Timings, *, since_tick: float, call_running_for: float | None) -> Verdict:
    """``/healthz``: ``since_tick`` seconds since the heartbeat last ticked and
    ``call_running_for`` the age of the call in progress (None: no call)."""
    if since_tick > heartbeat_stall_limit(timings):
        return False, "heartbeat loop stalled"
    limit = timings.call_timeout + timings.health_grace
    if call_running_for is not None and call_running_for > limit:
        return False, f"call running for {call_running_for:.1f} s, over its timeout"
    return OK


def readiness(
    *, redis_ok: bool, surplus: bool, lease_valid: bool, refused: str | None = None
) -> Verdict:
    """``/readyz``: the first reason, in this order, that keeps the slot from calling.
    ``refused``: why the slot takes no work although Redis answers (Redis refused
    a step, or may evict keys); None when nothing of the kind holds."""
    if not redis_ok:
        return False, "redis unreachable"
    if refused:
        return False, refused
    if surplus:
        return False, "slot index is beyond the pool's size"
    if not lease_valid:
        return False, "lease not held"
    return OK
