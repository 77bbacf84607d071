"""Waiting for a condition: a poll with a deadline, never a bare sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold before the deadline (an AssertionError, so a
    test that waits fails with the message rather than erroring)."""


def _message(timeout: float, what: str, last: object) -> str:
    tail = f"; last value {last!r}" if last is not None else ""
    return f"timed out after {timeout:g} s waiting for {what}{tail}"


def wait_for(
    predicate: Callable[[], T], timeout: float, *, interval: float = 0.02, what: str = ""
) -> T:
    """Call ``predicate`` until it returns something truthy and return that;
    raise :class:`WaitTimeout` once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(_message(timeout, what or repr(predicate), value))
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,
    *,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """:func:`wait_for` in an event loop; ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(_message(timeout, what or repr(predicate), value))
        await asyncio.sleep(interval)
