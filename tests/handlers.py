"""Handlers the tests run inside real slot processes."""

from __future__ import annotations

import asyncio
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
