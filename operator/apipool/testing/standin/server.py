"""The stand-in server: :class:`StandInApi` on an event loop, :class:`StandInThread` in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Iterator
from http import HTTPStatus
from types import TracebackType
from typing import Any

from ...errors import ConfigError
from .accounting import Accounting, StandInStats
from .connection import Connection
from .wire import header_value_ok

__all__ = ["StandInApi", "StandInThread", "run_in_thread"]

BACKLOG = 2048
"""Pending connections the listening socket queues."""
FORCED_STATUSES = (int(HTTPStatus.TOO_MANY_REQUESTS), int(HTTPStatus.SERVICE_UNAVAILABLE))
"""What :meth:`StandInApi.throttle_next` may answer."""


def _check_shared_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ConfigError(f"shared_limit must be >= 0 or None, got {limit}")


def _check_retry_after(value: str | None) -> None:
    if value is not None and not header_value_ok(value):
        raise ConfigError(f"retry_after must be printable ASCII, got {value!r}")


class StandInApi:
    """The stand-in API server; see :mod:`apipool.testing.standin` for its behaviour."""

    def __init__(
        self,
        limit: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default_ms: float = 100.0,
        linger_timeout: float = 120.0,
        idle_timeout: float = 60.0,
        shared_limit: int | None = None,
        retry_after: str | None = None,
    ) -> None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        _check_shared_limit(shared_limit)
        _check_retry_after(retry_after)
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
        self._acct = Accounting(limit, shared_limit=shared_limit, retry_after=retry_after)
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()

    async def start(self) -> None:
        """Listen; counters restart from zero."""
        if self._server is not None:
            raise RuntimeError("StandInApi is already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self, self._acct, self._connections),
            self.host,
            self._requested_port,
            backlog=BACKLOG,
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

    @property
    def shared_limit(self) -> int | None:
        """The shared limit on requests in flight now; ``None``: off."""
        return self._acct.shared_limit

    def set_shared_limit(self, limit: int | None) -> None:
        """From now on, a request arriving while ``limit`` requests are in flight is
        answered 429 at once (``None``: no shared limit). Requests already in flight
        are served to their end. The change is recorded in the stats. Thread-safe."""
        _check_shared_limit(limit)
        self._acct.set_shared_limit(limit)

    @property
    def retry_after(self) -> str | None:
        """The ``Retry-After`` value sent with 429s over a limit; ``None``: none."""
        return self._acct.retry_after

    def set_retry_after(self, value: str | None) -> None:
        """Send ``value`` verbatim as ``Retry-After`` with every 429 over a limit from
        now on (``None``: no such header). Thread-safe."""
        _check_retry_after(value)
        self._acct.set_retry_after(value)

    def throttle_next(self, count: int, status: int = 429, retry_after: str | None = None) -> None:
        """Answer the next ``count`` ``/work`` requests ``status`` (429 or 503) at
        once, with ``retry_after`` verbatim as ``Retry-After`` unless ``None``,
        whatever the limits. Replaces forced answers still pending (``count`` 0
        cancels them). Thread-safe."""
        if count < 0:
            raise ConfigError(f"count must be >= 0, got {count}")
        if status not in FORCED_STATUSES:
            raise ConfigError(f"status must be one of {FORCED_STATUSES}, got {status}")
        _check_retry_after(retry_after)
        self._acct.throttle_next(count, status, retry_after)

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

    def _serve(
        self, loop: asyncio.AbstractEventLoop, ready: threading.Event, failure: list[BaseException]
    ) -> None:
        """The thread's body: start the server, signal ``ready``, run until stopped."""
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

    def start(self, timeout: float = 10.0) -> StandInApi:
        """Start the thread and wait until the server listens."""
        if self._thread is not None:
            raise RuntimeError("StandInThread is already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._serve, args=(loop, ready, failure), name="standin-api", daemon=True
        )
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
