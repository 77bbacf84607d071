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


# -- hostile or careless handlers (tests/test_slot_hostile.py, tests/test_supervisor.py) --


class HandlerEscape(BaseException):
    """A BaseException of the handler's own (not an Exception)."""


_ESCAPES: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "HandlerEscape": HandlerEscape,
}


def _count_call(payload: Any, call: Call) -> None:
    """Appends ``<pid> <job id> <attempt>`` to the file ``payload["log"]``, if named."""
    if isinstance(payload, dict) and "log" in payload:
        with open(payload["log"], "a") as log:
            log.write(f"{os.getpid()} {call.job_id} {call.attempt}\n")


def raise_base(payload: Any, call: Call) -> None:
    """Raises the BaseException ``payload["kind"]`` names, from a worker thread."""
    _count_call(payload, call)
    raise _ESCAPES[payload["kind"]](payload.get("arg", "from the handler"))


async def raise_base_async(payload: Any, call: Call) -> None:
    """Raises the BaseException ``payload["kind"]`` names, in the slot's event loop."""
    _count_call(payload, call)
    await asyncio.sleep(0)
    raise _ESCAPES[payload["kind"]](payload.get("arg", "from the handler"))


def exit_on_first_attempt(payload: Any, call: Call) -> dict[str, int]:
    """Kills its own process (``os._exit(7)``) on attempt 1; answers on the next."""
    _count_call(payload, call)
    if call.attempt == 1:
        os._exit(7)
    return {"attempt": call.attempt}


def permanent_failure(payload: Any, call: Call) -> None:
    """Says that retrying cannot help, with a secret-bearing URL in the message."""
    from apipool import PermanentError

    _count_call(payload, call)
    raise PermanentError(f"422 from {payload.get('url', 'https://api.example/v1')}: bad input")


def leaky_failure(payload: Any, call: Call) -> None:
    """Fails (retryably) with a message carrying a URL with a key and a secret header."""
    _count_call(payload, call)
    raise RuntimeError(
        f'GET {payload["url"]} failed; request headers {{"Authorization": "{payload["token"]}"}}'
    )


def counted_not_json(payload: Any, call: Call) -> object:
    _count_call(payload, call)
    return {"when": object()}


def counted_big_result(payload: Any, call: Call) -> str:
    """Returns a string of ``payload["size"]`` characters."""
    _count_call(payload, call)
    return "x" * int(payload["size"])


def gated(payload: Any, call: Call) -> dict[str, int]:
    """Counts the call, then waits (up to 30 s) until the file ``payload["gate"]`` exists."""
    _count_call(payload, call)
    end = time.monotonic() + 30
    while not os.path.exists(payload["gate"]) and time.monotonic() < end:
        time.sleep(0.02)
    return {"attempt": call.attempt}


def die(payload: Any, call: Call) -> None:
    """The worker process dies on the spot (a crash no handler code can catch)."""
    os._exit(3)


# -- an API that says "slow down" (tests/test_throttled_slot.py) ----------------------


def slow_down(payload: Any, call: Call) -> dict[str, Any]:
    """Logs ``<start unix time> <job id> <attempt> <slot>`` to ``payload["log"]``; the
    first ``payload["times"]`` calls of a job (counted in ``<log>.<job id>``)
    raise RetryAfter(``payload.get("retry_after")``), the others sleep
    ``payload.get("seconds", 0.05)`` and answer."""
    from apipool.errors import RetryAfter

    start = time.time()
    with open(payload["log"], "a") as log:
        log.write(f"{start:.4f} {call.job_id} {call.attempt} {call.slot}\n")
    marks = f"{payload['log']}.{call.job_id}"
    with open(marks, "a+") as f:
        f.seek(0)
        seen = len(f.read())
        f.write("x")
    if seen < int(payload.get("times", 0)):
        raise RetryAfter(payload.get("retry_after"))
    time.sleep(float(payload.get("seconds", 0.05)))
    return {"started": start, "attempt": call.attempt}
