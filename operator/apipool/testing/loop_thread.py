"""Something asynchronous served on an event loop of its own, in a daemon thread.

A test (or a benchmark) is synchronous; the API emulator and the local node are
asyncio programs. :class:`LoopThread` runs one in a thread: :meth:`start` waits
until it is ready (or raises with why it did not start), :meth:`stop` asks it to
end and joins the thread, :meth:`run_on_loop` runs a coroutine there and waits.
A subclass writes :meth:`_serve` (set up, call :meth:`_serving`, run until
:meth:`_stopping` is called, tear down).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """A daemon thread running one coroutine (:meth:`_serve`) on its own loop."""

    what = "the loop thread"

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._up = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()
            self.loop.close()

    async def _serve(self) -> None:
        raise NotImplementedError

    def _serving(self) -> None:
        """Called by :meth:`_serve` once it is ready."""
        self._up = True
        self._ready.set()

    def _stopping(self) -> None:
        """Called on the loop by :meth:`stop`: make :meth:`_serve` return."""
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> Self:
        self._thread.start()
        if not self._ready.wait(timeout) or not self._up:
            raise RuntimeError(f"{self.what} did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._up and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopping)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"{self.what} did not stop")

    def run_on_loop(self, coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
        """Run ``coro`` on the thread's loop and wait for its result."""
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
