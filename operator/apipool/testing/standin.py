"""A stand-in external API that counts open connections against a hard limit.

The demo, the tests and the benchmarks point the pool at it to prove that the
fleet never goes over the limit. It is a minimal HTTP/1.1 server written
directly on an :class:`asyncio.Protocol` (no web framework), so that it sees a
connection open and close at the exact moment the event loop does.

Connections
===========

HTTP/1.1 persistent connections are supported, pipelining included. After a
response the server keeps the connection open and reads the next request on it
(bytes the client sent ahead are served in order, one request at a time),
unless the request asked to close: ``Connection: close``, or HTTP/1.0 without
``Connection: keep-alive``. A kept-alive response says ``Connection:
keep-alive`` and ``Keep-Alive: timeout=<idle_timeout>``; the server closes a
connection that has gone ``idle_timeout`` seconds without sending a whole
request head (from its opening, or from the end of the last response). A
response to a request that asked to close says ``Connection: close``; the
server then reads and discards anything further until the client closes or
``linger_timeout`` passes, and closes it then. A client that half-closes
(``shutdown(SHUT_WR)``) counts as gone at once, even mid-request.

Two counts
==========

*active* (``active``, ``max_concurrency``, the over-limit time and events)
    open **connections**: a connection counts from its first request head
    (``/stats`` aside) until it is closed, by the client (EOF or reset) or by
    the server (idle or linger timeout, a malformed head, ``/stats``,
    :meth:`StandInApi.stop`). This is what the limit is about: a kept-alive
    connection sitting idle between calls still counts, and so does a client
    frozen mid-call (SIGSTOP) until it is killed. Further requests on a
    counted connection do not count it again.
*in flight* (``in_flight``, ``max_in_flight``)
    **requests** being served: from the moment a request head has been read
    until its response is written. A 429 is answered as soon as its head is
    read, so it never shows here.

``busy_seconds`` is the integral over time of ``min(in_flight, limit)`` (the
API's capacity doing work, not merely held), so ``utilisation`` is in-flight
work / (``limit`` x elapsed). ``useful_seconds`` sums the actual service time
(head read to response written, the stand-in's own timer lateness included)
of the requests answered 200; ``nominal_seconds`` sums their ``ms / 1000``.
A request still in flight at a :meth:`StandInApi.reset` is timed from the
reset.

Routes
======

``GET|POST /work?ms=<float>``  sleep ``ms`` milliseconds, answer 200
                               ``{"ok": true, "ms": ms, "active": n}`` where
                               ``n`` is the active count on arrival.
``GET /stats``                 200 with :meth:`StandInApi.stats` as JSON
                               (``?samples=0`` leaves out the timeline), then
                               the server closes the connection (which drops
                               its count if it was counted). Not counted and
                               never limited.
anything else                  404.

A request that arrives while the active count (its own connection included)
is over the limit gets ``429 {"error": "over limit", "active": n, "limit":
L}`` at once; its body, if any, is skipped. 429, 404 and 400 (bad ``ms``)
follow the keep-alive rules above. A malformed request head gets 400 and the
server closes the connection (a head alone never counts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from http import HTTPStatus
from types import TracebackType
from typing import Any, NamedTuple, TypedDict
from urllib.parse import parse_qs, urlsplit

from apipool.errors import ConfigError

__all__ = [
    "OverLimitEvent",
    "StandInApi",
    "StandInStats",
    "StandInThread",
    "run_in_thread",
]

MAX_SAMPLES = 200_000
"""Timeline entries kept by :class:`StandInApi`; older ones are dropped."""

_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
_MAX_AHEAD = 1024 * 1024
"""Bytes sent ahead (pipelined) buffered while a request is served before reading pauses."""
_BACKLOG = 2048


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


class _Accounting:
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

    def request(self, new_connection: bool) -> tuple[int, float | None]:
        """Count a request head, and its connection if it is not counted yet.

        Return the active count including it, and the time the request went in
        flight, or ``None`` if it is over the limit (to be answered 429 at once).
        """
        with self.lock:
            now = time.monotonic()
            self._advance_locked(now)
            self.requests_total += 1
            n = self.active
            if new_connection:
                self.active = n = n + 1
                self.connections_total += 1
                self.max_concurrency = max(self.max_concurrency, n)
                if n > self.limit:
                    if self.events and self.events[-1]["end"] is None:
                        event = self.events[-1]
                        event["peak"] = max(event["peak"], n)
                    else:
                        self.events.append({"start": now - self.t0, "end": None, "peak": n})
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
        with self.lock:
            self._reset_locked()

    def useful_between(self, start: float, end: float) -> float:
        """Service time of 200 answers that falls within [start, end] (seconds
        since t0), whenever those requests began or ended."""
        with self.lock:
            spans = list(self.ok_spans)
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)

    def snapshot(self, include_samples: bool) -> StandInStats:
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


def _seconds(value: float) -> str:
    """``60.0`` -> ``"60"``, ``0.25`` -> ``"0.25"`` (millisecond precision)."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _response(status: int, payload: dict[str, Any], keep_alive: float | None = None) -> bytes:
    """A whole response; ``keep_alive`` is the idle timeout to announce, ``None`` to close."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    reason = HTTPStatus(status).phrase
    if keep_alive is None:
        connection = "Connection: close\r\n"
    else:
        connection = "Connection: keep-alive\r\n"
        if math.isfinite(keep_alive):
            connection += f"Keep-Alive: timeout={_seconds(keep_alive)}\r\n"
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{connection}\r\n"
    )
    return head.encode("ascii") + body


class _BadRequest(Exception):
    pass


class _Head(NamedTuple):
    method: str
    target: str
    length: int
    keep_alive: bool


class _Connection(asyncio.Protocol):
    """One client connection; the HTTP parsing and the timers live here.

    States: ``head`` (waiting for a request head; the idle timer runs),
    ``body`` (skipping the body of a request being served), ``work`` (its
    timer runs; bytes sent ahead are buffered), ``linger`` (answered a request
    that asked to close; anything further is discarded) and ``closed``.
    """

    def __init__(self, api: StandInApi) -> None:
        self._api = api
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._state = "head"
        self._counted = False
        self._started: float | None = None  # when the request in flight went in flight
        self._arrival_active = 0
        self._method = ""
        self._target = ""
        self._keep_alive = True
        self._skip = 0  # body bytes still to drop before the next request head
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._api._connections.add(self)
        self._arm(self._api.idle_timeout, self._idle_expired)

    def data_received(self, data: bytes) -> None:
        if self._state in ("linger", "closed"):
            return  # read and discarded
        self._buf += data
        if self._state == "work":
            # Sent ahead: served once the current response is written.
            if len(self._buf) > _MAX_AHEAD and not self._paused:
                assert self._transport is not None
                self._transport.pause_reading()
                self._paused = True
            return
        self._pump()

    def eof_received(self) -> bool:
        self._gone()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        self._api._connections.discard(self)

    # request handling -------------------------------------------------------

    def _pump(self) -> None:
        """Serve what is buffered until a request has to wait (work) or more bytes are needed.

        A loop rather than recursion, so that any number of requests sent ahead
        in one go is served without growing the stack.
        """
        while self._state in ("head", "body"):
            if self._skip:
                n = min(self._skip, len(self._buf))
                del self._buf[:n]
                self._skip -= n
                if self._skip:
                    return
            if self._state == "body":
                self._route()
            elif not self._read_head():
                return

    def _read_head(self) -> bool:
        """Handle one request head if a whole one is buffered; whether to go on."""
        while self._buf.startswith(b"\r\n"):  # tolerated between requests (RFC 9112 2.2)
            del self._buf[:2]
        end = self._buf.find(b"\r\n\r\n")
        if end < 0 or end > _MAX_HEAD:
            if end > _MAX_HEAD or len(self._buf) > _MAX_HEAD:
                self._reject_malformed("request head too large")
            return False
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        try:
            parsed = self._parse(head)
        except _BadRequest as exc:
            self._reject_malformed(str(exc))
            return False
        self._cancel_timer()  # a request: no longer idle
        self._method, self._target, self._skip, self._keep_alive = parsed
        if urlsplit(self._target).path == "/stats":
            self._answer_stats()
            return False
        n, started = self._api._acct.request(new_connection=not self._counted)
        self._counted = True
        self._arrival_active = n
        if started is None:
            self._reply(
                HTTPStatus.TOO_MANY_REQUESTS,
                {"error": "over limit", "active": n, "limit": self._api.limit},
            )
            return True
        self._started = started
        self._state = "body"
        return True

    @staticmethod
    def _parse(head: bytes) -> _Head:
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes anything
            raise _BadRequest("undecodable head") from exc
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if (
            len(parts) != 3
            or not parts[0].isalpha()
            or not parts[1].startswith("/")
            or not parts[2].startswith("HTTP/1.")
        ):
            raise _BadRequest("malformed request line")
        length = 0
        options: set[str] = set()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest("malformed header line")
            key = name.strip().lower()
            if key == "content-length":
                try:
                    length = int(value.strip())
                except ValueError as exc:
                    raise _BadRequest("bad Content-Length") from exc
                if not 0 <= length <= _MAX_BODY:
                    raise _BadRequest("bad Content-Length")
            elif key == "transfer-encoding" and value.strip().lower() != "identity":
                raise _BadRequest("Transfer-Encoding is not supported; send Content-Length")
            elif key == "connection":
                options.update(token.strip().lower() for token in value.split(","))
        if "close" in options:
            keep_alive = False
        elif parts[2] == "HTTP/1.0":
            keep_alive = "keep-alive" in options
        else:
            keep_alive = True
        return _Head(parts[0], parts[1], length, keep_alive)

    def _route(self) -> None:
        url = urlsplit(self._target)
        if url.path != "/work" or self._method not in ("GET", "POST"):
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not found", "path": url.path})
            return
        raw = parse_qs(url.query).get("ms")
        if raw is None:
            ms = self._api.default_ms
        else:
            try:
                ms = float(raw[-1])
            except ValueError:
                ms = -1.0
            if not math.isfinite(ms) or ms < 0:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": "ms must be a number >= 0"})
                return
        self._state = "work"
        self._arm(ms / 1000.0, self._work_done, ms)

    def _work_done(self, ms: float) -> None:
        self._timer = None
        if self._state != "work":
            return
        self._reply(HTTPStatus.OK, {"ok": True, "ms": ms, "active": self._arrival_active}, ms)
        self._pump()

    def _reply(self, status: int, payload: dict[str, Any], ms: float = 0.0) -> None:
        """Answer a counted request; then wait for the next one, or linger if asked to close."""
        assert self._transport is not None
        if self._started is not None:
            self._api._acct.done(self._started, status, ms)
            self._started = None
        if self._keep_alive:
            self._transport.write(_response(status, payload, self._api.idle_timeout))
            self._state = "head"
            self._arm(self._api.idle_timeout, self._idle_expired)
            if self._paused:
                self._paused = False
                self._transport.resume_reading()
        else:
            self._transport.write(_response(status, payload))
            self._state = "linger"
            self._buf.clear()
            self._arm(self._api.linger_timeout, self._linger_expired)
            if self._paused:
                self._paused = False
                self._transport.resume_reading()  # to see the client close

    def _idle_expired(self) -> None:
        self._timer = None
        self.abort()

    def _linger_expired(self) -> None:
        self._timer = None
        self.abort()

    def _answer_stats(self) -> None:
        assert self._transport is not None
        query = parse_qs(urlsplit(self._target).query)
        include = query.get("samples", ["1"])[-1] not in ("0", "false", "no")
        payload = self._api.stats(include_samples=include).to_dict()
        self._transport.write(_response(HTTPStatus.OK, payload))
        self._close()

    def _reject_malformed(self, why: str) -> None:
        assert self._transport is not None
        self._transport.write(_response(HTTPStatus.BAD_REQUEST, {"error": why}))
        self._close()

    def _close(self) -> None:
        """Close from the server side once the written bytes are flushed."""
        assert self._transport is not None
        self._cancel_timer()
        self._state = "closed"
        self._buf.clear()
        self._transport.close()  # connection_lost follows and uncounts it

    def _arm(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, callback, *args)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _gone(self) -> None:
        """The connection is over: stop the timer and the counts (once)."""
        self._state = "closed"
        self._buf.clear()
        self._cancel_timer()
        in_flight = self._started is not None
        if self._counted or in_flight:
            self._api._acct.leave(self._counted, in_flight)
            self._counted = False
            self._started = None

    def abort(self) -> None:
        """Close the connection now, from the server side."""
        self._gone()
        if self._transport is not None:
            self._transport.close()


class StandInApi:
    """The stand-in API server; see the module docstring for its behaviour."""

    def __init__(
        self,
        limit: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default_ms: float = 100.0,
        linger_timeout: float = 120.0,
        idle_timeout: float = 60.0,
    ) -> None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        if not math.isfinite(default_ms) or default_ms < 0:
            raise ConfigError(f"default_ms must be >= 0, got {default_ms}")
        if not linger_timeout > 0:
            raise ConfigError(f"linger_timeout must be > 0, got {linger_timeout}")
        if not idle_timeout > 0:
            raise ConfigError(f"idle_timeout must be > 0, got {idle_timeout}")
        self.limit = limit
        self.host = host
        self.default_ms = float(default_ms)
        self.linger_timeout = float(linger_timeout)
        self.idle_timeout = float(idle_timeout)
        self._requested_port = port
        self._acct = _Accounting(limit)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    async def start(self) -> None:
        """Listen; counters restart from zero."""
        if self._server is not None:
            raise RuntimeError("StandInApi is already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            self.host,
            self._requested_port,
            backlog=_BACKLOG,
            reuse_address=True,
        )
        self.reset()

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._connections):
            conn.abort()
        self._connections.clear()
        await server.wait_closed()

    async def __aenter__(self) -> StandInApi:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The port it listens on (known once started)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("StandInApi is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8080``."""
        return f"http://{self.host}:{self.port}"

    def stats(self, *, include_samples: bool = True) -> StandInStats:
        """A snapshot of the counters; safe to call from any thread."""
        return self._acct.snapshot(include_samples)

    def reset(self) -> None:
        """Zero the counters; connections open now stay counted. Thread-safe."""
        self._acct.reset()

    def useful_between(self, start: float, end: float) -> float:
        """Seconds of service of 200 answers inside [start, end] (seconds since the
        start or last reset), counting calls that straddle either edge in part.
        Read it after the calls have been answered. Thread-safe."""
        return self._acct.useful_between(start, end)


class StandInThread:
    """Runs a :class:`StandInApi` on its own event loop in a daemon thread."""

    def __init__(self, limit: int, **kwargs: Any) -> None:
        self.api = StandInApi(limit, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> StandInApi:
        """Start the thread and wait until the server listens."""
        if self._thread is not None:
            raise RuntimeError("StandInThread is already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.api.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.api.stop())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="standin-api", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("stand-in API did not start in time")
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        return self.api

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server, close its connections and join the thread."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("stand-in API thread did not stop in time")

    def __enter__(self) -> StandInApi:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def run_in_thread(limit: int, **kwargs: Any) -> Iterator[StandInApi]:
    """``with run_in_thread(4) as api:`` a started stand-in in a daemon thread."""
    with StandInThread(limit, **kwargs) as api:
        yield api
