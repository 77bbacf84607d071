"""Handlers: the user's function that calls the API, and the built-in ``http``.

A handler is ``fn(payload, call)``, sync or async; ``call`` is a :class:`Call`
with the job id and attempt (for idempotency keys). Its return value must be
JSON-serialisable and becomes the job's result.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from .errors import ConfigError

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


class HttpCallError(Exception):
    """The API answered with a status worth retrying (429 or 5xx)."""


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


def load_handler(spec: str) -> Handler:
    """Resolve one handler spec; raise ConfigError with a clear message."""
    name, target = _split_spec(spec.strip())
    if target == BUILTIN_HTTP:
        return Handler(name=name, spec=spec, fn=http_handler, is_async=True)
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


def load_handlers(specs: tuple[str, ...]) -> dict[str, Handler]:
    """Load every spec by name; the first one is also the default (key ``""``)."""
    if not specs:
        raise ConfigError("at least one handler is needed")
    table: dict[str, Handler] = {}
    for spec in specs:
        handler = load_handler(spec)
        if handler.name in table:
            raise ConfigError(f"handler name {handler.name!r} given twice")
        table[handler.name] = handler
        table.setdefault("", handler)
    return table


# -- the built-in http handler ------------------------------------------------

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_session: aiohttp.ClientSession | None = None


KEEPALIVE_SECONDS = 30.0


def _http_session() -> aiohttp.ClientSession:
    """One session per slot process holding at most ONE connection, kept alive
    between calls. A slot therefore holds at most one connection to the API,
    and it dies with the process, so N slots never hold more than N; reusing it
    saves a TCP (and TLS) handshake per call."""
    global _session
    if _session is None or _session.closed:
        _session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=KEEPALIVE_SECONDS),
            raise_for_status=False,
        )
    return _session


async def close_http_session() -> None:
    global _session
    if _session is not None and not _session.closed:
        await _session.close()
    _session = None


def parse_http_request(
    payload: Any,
) -> tuple[str, str, CIMultiDict[str], bytes | None, float | None]:
    """Check an http payload: ``method``, ``url``, optional ``headers``, ``body``, ``timeout``."""
    if not isinstance(payload, Mapping):
        raise ValueError("http payload must be an object with 'method' and 'url'")
    method = str(payload.get("method", "GET")).upper()
    if method not in HTTP_METHODS:
        raise ValueError(f"http payload: unsupported method {method!r}")
    url = payload.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError("http payload: 'url' must be an http(s) URL")
    raw_headers = payload.get("headers")
    if raw_headers is None:
        raw_headers = {}
    if not isinstance(raw_headers, Mapping):
        raise ValueError("http payload: 'headers' must be an object")
    headers: CIMultiDict[str] = CIMultiDict((str(k), str(v)) for k, v in raw_headers.items())
    body = payload.get("body")
    data: bytes | None
    if body is None:
        data = None
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    timeout = payload.get("timeout")
    if timeout is not None and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0
    ):
        raise ValueError("http payload: 'timeout' must be a positive number of seconds")
    return method, url, headers, data, float(timeout) if timeout is not None else None


async def http_handler(payload: Any, call: Call) -> dict[str, Any]:
    """Perform the HTTP request a payload describes; 429 and 5xx raise (retried)."""
    method, url, headers, data, timeout = parse_http_request(payload)
    limit = min(timeout, call.timeout) if timeout is not None else call.timeout
    headers.setdefault("Idempotency-Key", f"{call.job_id}")
    async with _http_session().request(
        method, url, headers=headers, data=data, timeout=aiohttp.ClientTimeout(total=limit)
    ) as response:
        body = await response.text(errors="replace")
        if response.status == 429 or response.status >= 500:
            raise HttpCallError(f"HTTP {response.status} from {url}: {body[:200]}")
        return {"status": response.status, "headers": dict(response.headers), "body": body}
