"""Handlers: the user's function that calls the API, and the built-in ``http``.

A handler is ``fn(payload, call)``, sync or async; ``call`` is a :class:`Call`
with the job id and attempt (for idempotency keys). Its return value must be
JSON-serialisable and becomes the job's result; a handler raises
:class:`~apipool.errors.PermanentError` when a retry cannot help. The built-in
``http`` handler lives in ``http_handler.py`` and is imported only when a slot
serves it; one handler object per policy, shared by the specs that name it.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .settings import HttpPolicy, Limits

HandlerFn = Callable[[Any, "Call"], Any]
BUILTIN_HTTP = "http"


@dataclass(frozen=True)
class Call:
    """What a handler knows about the job it is called for."""

    job_id: str
    attempt: int
    pool: str
    slot: int
    deadline: float | None
    timeout: float


@dataclass(frozen=True)
class Handler:
    name: str
    spec: str
    fn: HandlerFn
    is_async: bool

    async def run(self, payload: Any, call: Call) -> Any:
        """Run the handler in this task (async) or a worker thread (sync)."""
        if self.is_async:
            return await self.fn(payload, call)
        return await asyncio.to_thread(self.fn, payload, call)


def _split_spec(spec: str) -> tuple[str, str]:
    name, sep, target = spec.partition("=")
    if not sep:
        return spec, spec
    if not name or not target:
        raise ConfigError(f"handler {spec!r}: expected name=module:function")
    return name, target


def load_handler(
    spec: str, *, http: HttpPolicy | None = None, limits: Limits | None = None
) -> Handler:
    """Resolve one handler spec; raise ConfigError with a clear message. The
    built-in ``http`` handler follows ``http`` and ``limits`` (defaults: a
    policy that allows no private address, the default limits)."""
    name, target = _split_spec(spec.strip())
    if target == BUILTIN_HTTP:
        from .http_handler import shared_http_handler  # aiohttp: the slot extra

        builtin = shared_http_handler(http, limits)  # ConfigError on a bad allowed URL
        return Handler(name=name, spec=spec, fn=builtin, is_async=True)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"handler {spec!r}: expected 'http' or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is a configuration problem
        raise ConfigError(f"handler {spec!r}: cannot import {module_name!r}: {exc}") from exc
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"handler {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"handler {spec!r}: {attr!r} is not callable")
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callables
    )
    return Handler(name=name, spec=spec, fn=fn, is_async=is_async)


def load_handlers(
    specs: tuple[str, ...], *, http: HttpPolicy | None = None, limits: Limits | None = None
) -> dict[str, Handler]:
    """Load every spec by name; the first one is also the default (key ``""``)."""
    if not specs:
        raise ConfigError("at least one handler is needed")
    table: dict[str, Handler] = {}
    for spec in specs:
        handler = load_handler(spec, http=http, limits=limits)
        if handler.name in table:
            raise ConfigError(f"handler name {handler.name!r} given twice")
        table[handler.name] = handler
        table.setdefault("", handler)
    return table
