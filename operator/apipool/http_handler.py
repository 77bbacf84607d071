"""The built-in ``http`` handler: performs the HTTP request a job's payload describes.

One aiohttp session per slot process, holding at most one connection to the
API; it dies with the process, so N slots never hold more than N connections.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict

from .handlers import Call


class HttpCallError(Exception):
    """The API answered with a status worth retrying (429 or 5xx)."""


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
