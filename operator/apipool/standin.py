"""A stand-in external API that counts open connections against a hard limit.

The demo, the tests and the benchmarks point the pool at it to prove that the
fleet never goes over the limit. It is a minimal HTTP/1.1 server written
directly on an :class:`asyncio.Protocol` (no web framework), so that it sees a
connection open and close at the exact moment the event loop does.

A request is *active* from the moment its request head has been read until the
client closes the TCP connection (EOF or reset), not merely until the response
is written: like a real API that counts connections, a client frozen mid-call
(SIGSTOP) keeps its connection counted until it is killed. Every response says
``Connection: close``; afterwards the server keeps reading (and discarding)
until EOF or ``linger_timeout``. A connection is counted once, whatever the
client sends on it later. A client that half-closes (``shutdown(SHUT_WR)``)
counts as gone.

Routes
======

``GET|POST /work?ms=<float>``  sleep ``ms`` milliseconds, answer 200
                               ``{"ok": true, "ms": ms, "active": n}`` where
                               ``n`` is the active count on arrival.
``GET /stats``                 200 with :meth:`StandInApi.stats` as JSON
                               (``?samples=0`` leaves out the timeline). Not
                               counted and never limited.
anything else                  404.

A request that arrives while the active count including it is over the limit
gets ``429 {"error": "over limit", "active": n, "limit": L}`` at once. A
malformed request head gets 400 and the connection is closed (not counted).
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
from collections.abc import Iterator
from http import HTTPStatus
from types import TracebackType
from typing import Any, TypedDict
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
    """A consistent snapshot of the stand-in's counters."""

    limit: int
    started_at: float
    """Wall-clock time (``time.time()``) of the start or last reset."""
    elapsed_seconds: float
    active: int
    max_concurrency: int
    over_limit_seconds: float
    over_limit_events: list[OverLimitEvent]
    requests_total: int
    ok_total: int
    rejected_total: int
    busy_seconds: float
    """Integral over time of ``min(active, limit)``: capacity in use."""
    useful_seconds: float
    """Sum of ``ms / 1000`` over requests answered 200."""
    samples: list[tuple[float, int]]
    """``(seconds since start, active)`` at every change, oldest first."""

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
        self._reset_locked()

    def _reset_locked(self) -> None:
        now = time.monotonic()
        self.t0 = now
        self.wall0 = time.time()
        self.last = now
        self.max_concurrency = self.active
        self.over_limit_seconds = 0.0
        self.events: list[OverLimitEvent] = []
        if self.active > self.limit:
            self.events.append({"start": 0.0, "end": None, "peak": self.active})
        self.requests_total = 0
        self.ok_total = 0
        self.rejected_total = 0
        self.busy_seconds = 0.0
        self.useful_seconds = 0.0
        self.samples: deque[tuple[float, int]] = deque(maxlen=MAX_SAMPLES)
        self.samples.append((0.0, self.active))

    def _advance_locked(self, now: float) -> None:
        dt = now - self.last
        if dt > 0:
            self.busy_seconds += dt * min(self.active, self.limit)
            if self.active > self.limit:
                self.over_limit_seconds += dt
            self.last = now

    def enter(self) -> int:
        """Count a new connection; return the active count including it."""
        with self.lock:
            now = time.monotonic()
            self._advance_locked(now)
            self.active += 1
            self.requests_total += 1
            n = self.active
            self.max_concurrency = max(self.max_concurrency, n)
            rel = now - self.t0
            self.samples.append((rel, n))
            if n > self.limit:
                if self.events and self.events[-1]["end"] is None:
                    event = self.events[-1]
                    event["peak"] = max(event["peak"], n)
                else:
                    self.events.append({"start": rel, "end": None, "peak": n})
            return n

    def leave(self) -> None:
        """Stop counting a connection the client closed."""
        with self.lock:
            now = time.monotonic()
            self._advance_locked(now)
            self.active -= 1
            rel = now - self.t0
            self.samples.append((rel, self.active))
            if self.active <= self.limit and self.events and self.events[-1]["end"] is None:
                self.events[-1]["end"] = rel

    def answered(self, status: int, ms: float = 0.0) -> None:
        """Record the outcome of a counted request."""
        with self.lock:
            if status == HTTPStatus.OK:
                self.ok_total += 1
                self.useful_seconds += ms / 1000.0
            elif status == HTTPStatus.TOO_MANY_REQUESTS:
                self.rejected_total += 1

    def reset(self) -> None:
        with self.lock:
            self._reset_locked()

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
                over_limit_seconds=self.over_limit_seconds,
                over_limit_events=[OverLimitEvent(**e) for e in self.events],
                requests_total=self.requests_total,
                ok_total=self.ok_total,
                rejected_total=self.rejected_total,
                busy_seconds=self.busy_seconds,
                useful_seconds=self.useful_seconds,
                samples=list(self.samples) if include_samples else [],
            )


def _response(status: int, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    reason = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _BadRequest(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One client connection; the HTTP parsing and the timers live here."""

    def __init__(self, api: StandInApi) -> None:
        self._api = api
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._state = "head"  # head -> body -> work -> linger -> closed
        self._counted = False
        self._arrival_active = 0
        self._method = ""
        self._target = ""
        self._body_left = 0
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._api._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._state == "head":
            self._buf += data
            self._parse_head()
        elif self._state == "body":
            self._buf += data
            self._maybe_body_done()
        # work / linger / closed: anything further is read and discarded.

    def eof_received(self) -> bool:
        self._gone()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        self._api._connections.discard(self)

    # request handling -------------------------------------------------------

    def _parse_head(self) -> None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                self._reject_malformed("request head too large")
            return
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        try:
            self._method, self._target, self._body_left = self._parse(head)
        except _BadRequest as exc:
            self._reject_malformed(str(exc))
            return
        path = urlsplit(self._target).path
        if path == "/stats":
            self._answer_stats()
            return
        self._counted = True
        self._arrival_active = n = self._api._acct.enter()
        if n > self._api.limit:
            self._reply(
                HTTPStatus.TOO_MANY_REQUESTS,
                {"error": "over limit", "active": n, "limit": self._api.limit},
            )
            return
        self._state = "body"
        self._maybe_body_done()

    @staticmethod
    def _parse(head: bytes) -> tuple[str, str, int]:
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
        return parts[0], parts[1], length

    def _maybe_body_done(self) -> None:
        if len(self._buf) < self._body_left:
            return
        self._buf.clear()
        self._route()

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
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(ms / 1000.0, self._work_done, ms)

    def _work_done(self, ms: float) -> None:
        self._timer = None
        if self._state != "work":
            return
        self._reply(HTTPStatus.OK, {"ok": True, "ms": ms, "active": self._arrival_active}, ms)

    def _reply(self, status: int, payload: dict[str, Any], ms: float = 0.0) -> None:
        """Answer a counted request, then linger until the client closes."""
        assert self._transport is not None
        self._api._acct.answered(status, ms)
        self._transport.write(_response(status, payload))
        self._state = "linger"
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._api.linger_timeout, self._linger_expired)

    def _linger_expired(self) -> None:
        self._timer = None
        self.abort()

    def _answer_stats(self) -> None:
        assert self._transport is not None
        query = parse_qs(urlsplit(self._target).query)
        include = query.get("samples", ["1"])[-1] not in ("0", "false", "no")
        payload = self._api.stats(include_samples=include).to_dict()
        self._transport.write(_response(HTTPStatus.OK, payload))
        self._state = "closed"
        self._transport.close()

    def _reject_malformed(self, why: str) -> None:
        assert self._transport is not None
        self._transport.write(_response(HTTPStatus.BAD_REQUEST, {"error": why}))
        self._state = "closed"
        self._transport.close()

    def _gone(self) -> None:
        """The connection is over: stop the timers and the count (once)."""
        self._state = "closed"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self._api._acct.leave()

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
    ) -> None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        if not math.isfinite(default_ms) or default_ms < 0:
            raise ConfigError(f"default_ms must be >= 0, got {default_ms}")
        if not linger_timeout > 0:
            raise ConfigError(f"linger_timeout must be > 0, got {linger_timeout}")
        self.limit = limit
        self.host = host
        self.default_ms = float(default_ms)
        self.linger_timeout = float(linger_timeout)
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
