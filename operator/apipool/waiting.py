"""Waiting for an event with a timeout, without losing a cancellation.

On Python 3.11, ``asyncio.wait_for`` returns the awaited result when its task is
cancelled in the very moment that result arrives: the cancellation is gone. A
loop around such a wait then never ends, and whatever waits for the loop's task
(a shutdown's ``gather``, a stop) hangs with it. ``asyncio.timeout`` cancels
the waiting task itself and tells its own cancellation from any other, so a
cancellation always reaches the caller.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["wait_event"]


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``; whether it is set. A
    cancellation, even one that arrives as the event fires, propagates."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    return event.is_set()
