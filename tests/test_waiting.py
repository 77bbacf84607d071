"""wait_event: a timed wait that never swallows a cancellation (Python 3.11's
``asyncio.wait_for`` does when the awaited result arrives in the same moment)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from apipool.waiting import wait_event

pytestmark = [pytest.mark.unit, pytest.mark.asyncio, pytest.mark.timeout(10)]


async def loop_until_cancelled(event: asyncio.Event, woke: list[bool]) -> None:
    """A loop as a heartbeat or a status writer runs it: wait, act, wait again."""
    while True:
        woke.append(await wait_event(event, 30))
        event.clear()


async def test_a_cancellation_that_arrives_as_the_event_fires_ends_the_loop() -> None:
    event = asyncio.Event()
    woke: list[bool] = []
    task = asyncio.create_task(loop_until_cancelled(event, woke))
    await asyncio.sleep(0)  # the loop waits now
    event.set()
    task.cancel()  # in the same moment
    done, _ = await asyncio.wait({task}, timeout=3)
    assert task in done, "the cancellation was swallowed: the loop waits on"
    assert task.cancelled()
    assert woke == []


async def test_it_says_whether_the_event_fired_or_the_time_ran_out() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    assert await wait_event(event, 0) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 30) is True
    assert await wait_event(event, 0) is True  # already set: at once


async def test_a_plain_cancellation_while_waiting_propagates() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(wait_event(event, 30))
    await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
