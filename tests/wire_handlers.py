"""Handlers for the wire-format tests, run inside a real slot process."""

from __future__ import annotations

from typing import Any

from apipool.handlers import Call


def echo(payload: Any, call: Call) -> dict[str, Any]:
    return {"echo": payload, "job": call.job_id, "attempt": call.attempt}
