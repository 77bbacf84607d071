"""The stand-in's counters: open connections, requests in flight, time over the limit.

:class:`Accounting` is the only state shared between the server's event loop
and the threads that read it (a test, the demo's live view): every method takes
its lock, and :meth:`Accounting.snapshot` hands out a consistent
:class:`StandInStats`. It knows nothing about sockets or HTTP; the connection
protocol calls :meth:`~Accounting.request`, :meth:`~Accounting.done` and
:meth:`~Accounting.leave` at the right moments.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from http import HTTPStatus
from typing import Any, TypedDict

__all__ = ["MAX_SAMPLES", "Accounting", "OverLimitEvent", "StandInStats"]

MAX_SAMPLES = 200_000
"""Timeline entries kept by :class:`Accounting`; older ones are dropped."""


class OverLimitEvent(TypedDict):
    """A span during which more connections were open than the limit allows.

    ``start`` and ``end`` are seconds since the start (or last reset); ``end``
    is ``None`` while the span is still going on. ``peak`` is its highest count.
    """

    start: float
    end: float | None
    peak: int


@dataclasses.dataclass(frozen=True)
class StandInStats:
    """A consistent snapshot of the stand-in's counters (since the start or last reset)."""

    limit: int
    started_at: float
    """Wall-clock time (``time.time()``) of the start or last reset."""
    elapsed_seconds: float
    active: int
    """Open connections that have sent a request head."""
    max_concurrency: int
    """Highest ``active``."""
    in_flight: int
    """Requests being served (head read, response not yet written)."""
    max_in_flight: int
    """Highest ``in_flight``."""
    over_limit_seconds: float
    """Time during which ``active`` was over ``limit``."""
    over_limit_events: list[OverLimitEvent]
    connections_total: int
    """Connections counted (each once, at its first request head)."""
    requests_total: int
    """Request heads counted (``/stats`` and malformed heads aside)."""
    ok_total: int
    rejected_total: int
    """Requests answered 429."""
    busy_seconds: float
    """Integral over time of ``min(in_flight, limit)``: capacity doing work."""
    useful_seconds: float
    """Sum of the actual service times (head read to response written) of 200 answers."""
    nominal_seconds: float
    """Sum of ``ms / 1000`` over requests answered 200."""
    samples: list[tuple[float, int, int]]
    """``(seconds since start, active, in_flight)`` at every change, oldest first."""

    @property
    def utilisation(self) -> float:
        """``busy_seconds`` as a fraction of ``limit * elapsed_seconds``."""
        capacity = self.limit * self.elapsed_seconds
        return self.busy_seconds / capacity if capacity > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as plain JSON-serialisable data."""
        out = dataclasses.asdict(self)
        out["samples"] = [list(s) for s in self.samples]
        return out


class Accounting:
    """The counters, guarded by a lock so any thread may read or reset them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.active = 0
        self.in_flight = 0
        self._reset_locked()

    def _reset_locked(self) -> None:
        now = time.monotonic()
        self.t0 = now
        self.wall0 = time.time()
        self.last = now
        self.max_concurrency = self.active
        self.max_in_flight = self.in_flight
        self.over_limit_seconds = 0.0
        self.events: list[OverLimitEvent] = []
        if self.active > self.limit:
            self.events.append({"start": 0.0, "end": None, "peak": self.active})
        self.connections_total = 0
        self.requests_total = 0
        self.ok_total = 0
        self.rejected_total = 0
        self.busy_seconds = 0.0
        self.useful_seconds = 0.0
        self.nominal_seconds = 0.0
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=MAX_SAMPLES)
        self.samples.append((0.0, self.active, self.in_flight))
        # (start, end) of every 200 answer, seconds since t0, for exact windows
        self.ok_spans: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)

    def _advance_locked(self, now: float) -> None:
        dt = now - self.last
        if dt > 0:
            self.busy_seconds += dt * min(self.in_flight, self.limit)
            if self.active > self.limit:
                self.over_limit_seconds += dt
            self.last = now

    def _sample_locked(self, now: float) -> None:
        self.samples.append((now - self.t0, self.active, self.in_flight))

    def _open_locked(self, now: float) -> int:
        """Count one more connection; open or widen the over-limit event it causes."""
        self.active = n = self.active + 1
        self.connections_total += 1
        self.max_concurrency = max(self.max_concurrency, n)
        if n > self.limit:
            if self.events and self.events[-1]["end"] is None:
                event = self.events[-1]
                event["peak"] = max(event["peak"], n)
            else:
                self.events.append({"start": now - self.t0, "end": None, "peak": n})
        return n

    def request(self, new_connection: bool) -> tuple[int, float | None]:
        """Count a request head, and its connection if it is not counted yet.

        Return the active count including it, and the time the request went in
        flight, or ``None`` if it is over the limit (to be answered 429 at once).
        """
        with self.lock:
            now = time.monotonic()
            self._advance_locked(now)
            self.requests_total += 1
            n = self._open_locked(now) if new_connection else self.active
            if n > self.limit:
                self.rejected_total += 1
                if new_connection:
                    self._sample_locked(now)
                return n, None
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._sample_locked(now)
            return n, now

    def done(self, started: float, status: int, ms: float) -> None:
        """A request in flight since ``started`` is answered ``status``."""
        with self.lock:
            now = time.monotonic()
            self._advance_locked(now)
            self.in_flight -= 1
            if status == HTTPStatus.OK:
                self.ok_total += 1
                self.useful_seconds += now - max(started, self.t0)
                self.nominal_seconds += ms / 1000.0
                self.ok_spans.append((started - self.t0, now - self.t0))
            self._sample_locked(now)

    def leave(self, counted: bool, in_flight: bool) -> None:
        """A connection is closed: uncount it and drop its request in flight, if any."""
        with self.lock:
            now = time.monotonic()
            self._advance_locked(now)
            if in_flight:
                self.in_flight -= 1
            if counted:
                self.active -= 1
                if self.active <= self.limit and self.events and self.events[-1]["end"] is None:
                    self.events[-1]["end"] = now - self.t0
            self._sample_locked(now)

    def reset(self) -> None:
        """Zero the counters and restart the clock; open connections stay counted."""
        with self.lock:
            self._reset_locked()

    def useful_between(self, start: float, end: float) -> float:
        """Service time of 200 answers that falls within [start, end] (seconds
        since t0), whenever those requests began or ended."""
        with self.lock:
            spans = list(self.ok_spans)
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)

    def snapshot(self, include_samples: bool) -> StandInStats:
        """The counters as they are now (time-based ones brought up to date)."""
        with self.lock:
            now = time.monotonic()
            self._advance_locked(now)
            return StandInStats(
                limit=self.limit,
                started_at=self.wall0,
                elapsed_seconds=now - self.t0,
                active=self.active,
                max_concurrency=self.max_concurrency,
                in_flight=self.in_flight,
                max_in_flight=self.max_in_flight,
                over_limit_seconds=self.over_limit_seconds,
                over_limit_events=[OverLimitEvent(**e) for e in self.events],
                connections_total=self.connections_total,
                requests_total=self.requests_total,
                ok_total=self.ok_total,
                rejected_total=self.rejected_total,
                busy_seconds=self.busy_seconds,
                useful_seconds=self.useful_seconds,
                nominal_seconds=self.nominal_seconds,
                samples=list(self.samples) if include_samples else [],
            )
