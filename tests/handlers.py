"""Handlers the tests run inside real slot processes."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from apipool.handlers import Call


def echo(payload: Any, call: Call) -> dict[str, Any]:
    return {"echo": payload, "job": call.job_id, "attempt": call.attempt, "slot": call.slot}


async def sleep(payload: Any, call: Call) -> dict[str, Any]:
    await asyncio.sleep(float(payload.get("seconds", 0.1)))
    return {"slept": payload.get("seconds", 0.1), "attempt": call.attempt}


def always_raise(payload: Any, call: Call) -> None:
    raise RuntimeError(f"the API said no to {payload!r}")


def fail_first(payload: Any, call: Call) -> dict[str, Any]:
    if call.attempt == 1:
        raise ConnectionError("connection reset on the first attempt")
    return {"attempt": call.attempt}


def block_sync(payload: Any, call: Call) -> None:
    time.sleep(float(payload.get("seconds", 30)))


def not_json(payload: Any, call: Call) -> object:
    return object()


async def ignore_cancel(payload: Any, call: Call) -> None:
    """Sleeps through every cancellation: a call that overruns its timeout for good."""
    end = time.monotonic() + float(payload.get("seconds", 60))
    while time.monotonic() < end:
        try:
            await asyncio.sleep(end - time.monotonic())
        except asyncio.CancelledError:
            continue


def record_call(payload: Any, call: Call) -> dict[str, int]:
    """Appends ``<pid> <job id> <attempt>`` to the file the payload names: every call counts."""
    with open(payload["log"], "a") as log:
        log.write(f"{os.getpid()} {call.job_id} {call.attempt}\n")
    return {"pid": os.getpid()}
