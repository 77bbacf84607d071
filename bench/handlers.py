"""Handlers the benchmarks run in slot processes (``--handler bench.handlers:NAME``).

A handler is ``fn(payload, call)``, sync (run in a worker thread by the slot) or
async (awaited in the slot's event loop); ``call`` is an :class:`apipool.handlers.Call`.
"""

from __future__ import annotations

import time
from typing import Any

from apipool.handlers import Call


async def noop(payload: Any, call: Call) -> None:
    """Do nothing: what is left of a job is the slot's own cost."""
    return None


def noop_sync(payload: Any, call: Call) -> None:
    """Do nothing, in the slot's worker thread."""
    return None


def record_start(payload: Any, call: Call) -> dict[str, float]:
    """Return the wall-clock time at which the (sync) handler was entered."""
    return {"started": time.time()}


async def record_start_async(payload: Any, call: Call) -> dict[str, float]:
    """Return the wall-clock time at which the (async) handler was entered."""
    return {"started": time.time()}
