"""The stand-in's counters: open connections, requests in flight, time over the limit.

:class:`Accounting` is the only state shared between the server's event loop
and the threads that read it (a test, the demo's live view): every method takes
its lock, and :meth:`Accounting.snapshot` hands out a consistent
:class:`StandInStats`. It also holds the settings that other threads change
while the server runs (the shared limit, the ``Retry-After`` value, the forced
answers), so that a request is judged against one consistent view of them. It
knows nothing about sockets; the connection protocol calls
:meth:`~Accounting.request`, :meth:`~Accounting.done` and
:meth:`~Accounting.leave` at the right moments, and answers a request that
:meth:`~Accounting.request` refused as its :class:`Refusal` says.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from http import HTTPStatus
from typing import Any, NamedTuple, TypedDict

__all__ = [
    "MAX_SAMPLES",
    "Accounting",
    "Admission",
    "OverLimitEvent",
    "Refusal",
    "StandInStats",
]

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


class Refusal(NamedTuple):
    """How to answer a request that is not served: at once, with this status and body."""

    status: int
    payload: dict[str, Any]
    retry_after: str | None
    """The ``Retry-After`` header's value, sent verbatim; ``None``: no such header."""


class Admission(NamedTuple):
    """What :meth:`Accounting.request` decided about a request head."""

    active: int
    """Open connections counted, the request's own included."""
    started: float | None
    """When it went in flight (``time.monotonic()``); ``None`` if refused."""
    refusal: Refusal | None
    """How to answer it at once, if it is refused."""


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
    """Requests answered at once without being served: over the limit (429), over
    the shared limit (429) or forced (:meth:`Accounting.throttle_next`: 429 or 503)."""
    busy_seconds: float
    """Integral over time of ``min(in_flight, limit)``: capacity doing work."""
    useful_seconds: float
    """Sum of the actual service times (head read to response written) of 200 answers."""
    nominal_seconds: float
    """Sum of ``ms / 1000`` over requests answered 200."""
    samples: list[tuple[float, int, int]]
    """``(seconds since start, active, in_flight)`` at every change, oldest first."""
    shared_limit: int | None = None
    """The shared limit on requests in flight now; ``None``: off."""
    shared_limits: list[tuple[float, int | None]] = dataclasses.field(default_factory=list)
    """``(seconds since start, shared limit)``: the one in force at the start, then
    every change, oldest first."""
    shared_rejected_total: int = 0
    """Requests answered 429 because ``in_flight`` was at the shared limit (counted in
    ``rejected_total`` too)."""
    forced_total: int = 0
    """Requests answered at once by :meth:`Accounting.throttle_next` (in ``rejected_total``)."""
    retry_after: str | None = None
    """The ``Retry-After`` value sent with 429s over a limit now; ``None``: none."""
    rejected_at: list[float] = dataclasses.field(default_factory=list)
    """Seconds since start at which each request counted in ``rejected_total`` arrived,
    oldest first (left out with the timeline)."""

    @property
    def utilisation(self) -> float:
        """``busy_seconds`` as a fraction of ``limit * elapsed_seconds``."""
        capacity = self.limit * self.elapsed_seconds
        return self.busy_seconds / capacity if capacity > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as plain JSON-serialisable data."""
        out = dataclasses.asdict(self)
        out["samples"] = [list(s) for s in self.samples]
        out["shared_limits"] = [list(s) for s in self.shared_limits]
        return out


class Accounting:
    """The counters, guarded by a lock so any thread may read or reset them."""

    def __init__(
        self, limit: int, *, shared_limit: int | None = None, retry_after: str | None = None
    ) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.active = 0
        self.in_flight = 0
        # Settings, changed at run time from any thread; kept across a reset.
        self.shared_limit = shared_limit
        self.retry_after = retry_after
        self.forced_left = 0
        self.forced = Refusal(429, {"error": "throttled"}, None)
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
        self.shared_rejected_total = 0
        self.forced_total = 0
        self.rejected_at: deque[float] = deque(maxlen=MAX_SAMPLES)
        self.shared_limits: deque[tuple[float, int | None]] = deque(maxlen=MAX_SAMPLES)
        self.shared_limits.append((0.0, self.shared_limit))
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

    def _refusal_locked(self, n: int, work: bool) -> Refusal | None:
        """Whether a request is refused, and how: forced answers first (``/work`` only,
        whatever the limits), then the hard limit on connections, then the shared
        limit on requests in flight."""
        if work and self.forced_left > 0:
            self.forced_left -= 1
            self.forced_total += 1
            return self.forced
        if n > self.limit:
            body = {"error": "over limit", "active": n, "limit": self.limit}
            return Refusal(HTTPStatus.TOO_MANY_REQUESTS, body, self.retry_after)
        shared = self.shared_limit
        if shared is not None and self.in_flight >= shared:
            self.shared_rejected_total += 1
            body = {"error": "shared limit", "in_flight": self.in_flight, "limit": shared}
            return Refusal(HTTPStatus.TOO_MANY_REQUESTS, body, self.retry_after)
        return None

    def request(self, new_connection: bool, *, work: bool = False) -> Admission:
        """Count a request head (``work``: one for ``/work``), and its connection
        if it is not counted yet; decide whether it goes in flight or is refused."""
        with self.lock:
            now = time.monotonic()
            self._advance_locked(now)
            self.requests_total += 1
            n = self._open_locked(now) if new_connection else self.active
            refusal = self._refusal_locked(n, work)
            if refusal is not None:
                self.rejected_total += 1
                self.rejected_at.append(now - self.t0)
                if new_connection:
                    self._sample_locked(now)
                return Admission(n, None, refusal)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._sample_locked(now)
            return Admission(n, now, None)

    def set_shared_limit(self, limit: int | None) -> None:
        """Requests arriving while ``limit`` are in flight are refused from now on
        (``None``: no shared limit); the change is recorded."""
        with self.lock:
            now = time.monotonic()
            self._advance_locked(now)
            self.shared_limit = limit
            self.shared_limits.append((now - self.t0, limit))

    def set_retry_after(self, value: str | None) -> None:
        """The ``Retry-After`` value of 429s over a limit from now on (``None``: none)."""
        with self.lock:
            self.retry_after = value

    def throttle_next(self, count: int, status: int, retry_after: str | None) -> None:
        """The next ``count`` ``/work`` requests are refused with ``status`` and
        ``retry_after``, whatever the limits; replaces forced answers still pending."""
        with self.lock:
            self.forced_left = count
            self.forced = Refusal(status, {"error": "throttled"}, retry_after)

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
                shared_limit=self.shared_limit,
                shared_limits=list(self.shared_limits),
                shared_rejected_total=self.shared_rejected_total,
                forced_total=self.forced_total,
                retry_after=self.retry_after,
                rejected_at=list(self.rejected_at) if include_samples else [],
            )
