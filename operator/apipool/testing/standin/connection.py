"""One client connection of the stand-in: HTTP/1.1 keep-alive, pipelining, the timers.

:class:`Connection` is an :class:`asyncio.Protocol`, so it sees a connection
open and close at the exact moment the event loop does, and tells the
:class:`~.accounting.Accounting` when a request head arrives, when its response
is written and when the connection is gone.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from .accounting import Accounting
from .wire import MAX_HEAD, BadRequest, parse_head, response

if TYPE_CHECKING:
    from .server import StandInApi

__all__ = ["MAX_AHEAD", "Connection"]

MAX_AHEAD = 1024 * 1024
"""Bytes sent ahead (pipelined) buffered while a request is served before reading pauses."""


class Connection(asyncio.Protocol):
    """One client connection; the request handling and the timers live here.

    States: ``head`` (waiting for a request head; the idle timer runs),
    ``body`` (skipping the body of a request being served), ``work`` (its
    timer runs; bytes sent ahead are buffered), ``linger`` (answered a request
    that asked to close; anything further is discarded) and ``closed``.

    ``api`` gives the settings (limit, default ``ms``, timeouts), read when
    needed; ``accounting`` is told of every change; ``registry`` holds the open
    connections so that the server can close them when it stops.
    """

    def __init__(self, api: StandInApi, accounting: Accounting, registry: set[Connection]) -> None:
        self._api = api
        self._acct = accounting
        self._registry = registry
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
        self._registry.add(self)
        self._arm(self._api.idle_timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        if self._state in ("linger", "closed"):
            return  # read and discarded
        self._buf += data
        if self._state == "work":
            # Sent ahead: served once the current response is written.
            if len(self._buf) > MAX_AHEAD and not self._paused:
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
        self._registry.discard(self)

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
        if end < 0 or end > MAX_HEAD:
            if end > MAX_HEAD or len(self._buf) > MAX_HEAD:
                self._reject_malformed("request head too large")
            return False
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        try:
            parsed = parse_head(head)
        except BadRequest as exc:
            self._reject_malformed(str(exc))
            return False
        self._cancel_timer()  # a request: no longer idle
        self._method, self._target, self._skip, self._keep_alive = parsed
        if urlsplit(self._target).path == "/stats":
            self._answer_stats()
            return False
        return self._admit()

    def _admit(self) -> bool:
        """Count the request just read: answer at once if it is refused (over a
        limit, or a forced answer), else serve it."""
        work = urlsplit(self._target).path == "/work"
        n, started, refusal = self._acct.request(new_connection=not self._counted, work=work)
        self._counted = True
        self._arrival_active = n
        if refusal is not None:
            self._reply(refusal.status, refusal.payload, retry_after=refusal.retry_after)
            return True
        assert started is not None
        self._started = started
        self._state = "body"
        return True

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

    def _reply(
        self,
        status: int,
        payload: dict[str, Any],
        ms: float = 0.0,
        *,
        retry_after: str | None = None,
    ) -> None:
        """Answer a counted request; then wait for the next one, or linger if asked to close."""
        assert self._transport is not None
        if self._started is not None:
            self._acct.done(self._started, status, ms)
            self._started = None
        if self._keep_alive:
            idle = self._api.idle_timeout
            self._transport.write(response(status, payload, idle, retry_after=retry_after))
            self._state = "head"
            self._arm(self._api.idle_timeout, self._expired)
        else:
            self._transport.write(response(status, payload, retry_after=retry_after))
            self._state = "linger"
            self._buf.clear()
            self._arm(self._api.linger_timeout, self._expired)
        if self._paused:
            self._paused = False
            self._transport.resume_reading()  # the next request, or to see the client close

    def _expired(self) -> None:
        """The idle or the linger timer ran out."""
        self._timer = None
        self.abort()

    def _answer_stats(self) -> None:
        assert self._transport is not None
        query = parse_qs(urlsplit(self._target).query)
        include = query.get("samples", ["1"])[-1] not in ("0", "false", "no")
        payload = self._acct.snapshot(include).to_dict()
        self._transport.write(response(HTTPStatus.OK, payload))
        self._close()

    def _reject_malformed(self, why: str) -> None:
        assert self._transport is not None
        self._transport.write(response(HTTPStatus.BAD_REQUEST, {"error": why}))
        self._close()

    def _close(self) -> None:
        """Close from the server side once the written bytes are flushed."""
        assert self._transport is not None
        self._cancel_timer()
        self._state = "closed"
        self._buf.clear()
        self._transport.close()  # connection_lost follows and uncounts it

    # timers and teardown ------------------------------------------------------

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
            self._acct.leave(self._counted, in_flight)
            self._counted = False
            self._started = None

    def abort(self) -> None:
        """Close the connection now, from the server side."""
        self._gone()
        if self._transport is not None:
            self._transport.close()
