"""Where one slot process's wall time went (pure; takes a clock).

:class:`SlotTime` splits the time since it was made (the process start, or
:meth:`SlotTime.restart`) into the states of :data:`STATES`. At every moment
the slot is in exactly one state, so the seconds of all states add up to the
elapsed time exactly: a change of state closes the open stretch at the clock's
reading and opens the next one at the same reading, and nothing is counted
twice or left out.

The states:

- ``starting``: from the process start until the lease is first held and the
  predecessor's work recovered is about to begin;
- ``recovering``: recovering a predecessor's in-flight job;
- ``waiting_for_work``: the blocking take on an empty queue;
- ``calling``: inside a handler call (the only state that uses paid capacity);
- ``handoff``: between calls: taking a job that is there, checking it,
  writing its outcome, the fence check before a call. It exists so that the
  rest stays honest: without it this time would be booked as ``calling`` or
  ``waiting_for_work`` and the accounting would overstate one of them;
- ``held_back``: the pool is paused by a ``Retry-After`` or this slot is parked
  above the pool's effective concurrency;
- ``fenced``: Redis is unreachable or refuses the slot's steps, or the lease is
  not valid: the slot may not call although it is up.

``fenced`` is set apart (:meth:`SlotTime.fence`) by the heartbeat, which is the
one that knows it; while it is set it takes the place of the loop's own state,
except ``starting``, ``recovering`` and ``calling`` (a call already running
still uses the API, and a slot that never held its lease is still starting).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, get_args

State = Literal[
    "starting",
    "recovering",
    "waiting_for_work",
    "calling",
    "handoff",
    "held_back",
    "fenced",
]
STATES: tuple[State, ...] = get_args(State)
"""Every state of a slot's wall time, in the order reports list them."""

UNFENCED: frozenset[State] = frozenset({"starting", "recovering", "calling"})
"""The loop's states that ``fenced`` does not take the place of."""


class SlotTime:
    """Seconds per state of one slot process; the states always sum to the
    time elapsed since the start (see the module's docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.restart()

    def restart(self) -> None:
        """Start again from zero, in ``starting``, now (a warm standby that
        becomes the active worker: its wait was not the slot's time)."""
        now = self._clock()
        self._started = now
        self._since = now
        self._base: State = "starting"
        self._fenced = False
        self._totals: dict[State, float] = dict.fromkeys(STATES, 0.0)
        self._taken: dict[State, float] = dict.fromkeys(STATES, 0.0)

    @property
    def current(self) -> State:
        """The state the time is booked to now."""
        if self._fenced and self._base not in UNFENCED:
            return "fenced"
        return self._base

    @property
    def base(self) -> State:
        """The work loop's own state (what ``fenced`` may be covering)."""
        return self._base

    def _close(self) -> None:
        now = self._clock()
        self._totals[self.current] += max(0.0, now - self._since)
        self._since = max(self._since, now)

    def enter(self, state: State) -> State:
        """Book the time from now on to ``state``; returns the state left."""
        if state not in STATES:
            raise ValueError(f"unknown slot state {state!r}; one of {', '.join(STATES)}")
        self._close()
        previous, self._base = self._base, state
        return previous

    @contextmanager
    def state(self, name: State) -> Iterator[None]:
        """``with slot_time.state("calling"):`` books the block to ``name`` and
        then returns to the state it found (also when the block raises)."""
        previous = self.enter(name)
        try:
            yield
        finally:
            self.enter(previous)

    def fence(self, fenced: bool) -> None:
        """The heartbeat's verdict: True while Redis or the lease keeps the slot off."""
        if fenced != self._fenced:
            self._close()
            self._fenced = fenced

    def elapsed(self) -> float:
        """Seconds since the start (equal to the sum of :meth:`totals`)."""
        return max(0.0, self._clock() - self._started)

    def totals(self) -> dict[str, float]:
        """Seconds per state since the start, the open stretch included."""
        totals: dict[str, float] = {s: v for s, v in self._totals.items()}
        totals[self.current] += max(0.0, self._clock() - self._since)
        return totals

    def take_deltas(self) -> dict[str, float]:
        """Seconds per state since the previous call (since the start at first);
        states with no time are left out. Each second is returned once."""
        self._close()
        deltas = {s: self._totals[s] - self._taken[s] for s in STATES}
        self._taken = dict(self._totals)
        return {s: v for s, v in deltas.items() if v > 0}
