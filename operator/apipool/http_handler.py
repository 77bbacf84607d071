"""The built-in ``http`` handler: performs the HTTP request a job's payload describes.

Safe by default, because whoever can push a job chooses the request:

- the URL must pass the pool's :class:`~apipool.url_policy.UrlPolicy` (the
  allow-list, and no loopback, private or link-local address unless allowed),
  checked on the addresses a name resolves to, in the connector itself;
- redirects are returned as answers unless ``follow_redirects``; then at most
  :data:`MAX_REDIRECTS`, each target checked again, and credentials never sent
  to another origin than the payload's URL;
- no cookie jar: nothing one job receives is sent with another;
- the body is read in chunks and the call fails past ``max_response_bytes``;
- a 429, or a 503 with ``Retry-After``, is the API saying "slow down": it raises
  :class:`~apipool.errors.RetryAfter` with the seconds asked for (throttling.py).

One aiohttp session per slot process (per policy) holds at most ONE connection,
kept alive between calls; it dies with the process, so N slots never hold more
than N connections to the API.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict
from yarl import URL

from .errors import PermanentError, RetryAfter
from .handlers import Call
from .http_request import (
    HTTP_METHODS,
    HttpPayloadError,
    parse_http_request,
    parse_url,
    without_credentials,
)
from .redact import redact_text, redact_url
from .settings import HttpPolicy, Limits
from .throttling import parse_retry_after
from .url_policy import CheckedResolver, UrlPolicy, UrlRefused, origin

__all__ = [
    "HTTP_METHODS",
    "MAX_REDIRECTS",
    "HttpCallError",
    "HttpHandler",
    "HttpPayloadError",
    "ResponseTooLarge",
    "UrlRefused",
    "close_http_session",
    "parse_http_request",
    "shared_http_handler",
]

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 30.0
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024
ERROR_PREVIEW_BYTES = 1024

SocketFactory = Callable[[Any], Any]


class HttpCallError(Exception):
    """The call failed in a way worth retrying: 429, 5xx, a connection error, a timeout."""


class ResponseTooLarge(PermanentError):
    """The response body is larger than ``max_response_bytes`` (it will not shrink)."""


_handlers: weakref.WeakSet[HttpHandler] = weakref.WeakSet()
_shared: dict[tuple[HttpPolicy, Limits], HttpHandler] = {}


class HttpHandler:
    """The ``http`` handler of one policy: ``await handler(payload, call)``.

    ``resolver`` replaces the system resolver (its answers are still checked);
    ``socket_factory`` is passed to the connector. Both are for special
    networks and tests."""

    def __init__(
        self,
        policy: HttpPolicy | None = None,
        limits: Limits | None = None,
        *,
        resolver: AbstractResolver | None = None,
        socket_factory: SocketFactory | None = None,
    ) -> None:
        self.policy = policy if policy is not None else HttpPolicy()
        self.limits = limits if limits is not None else Limits()
        self.urls = UrlPolicy(self.policy.allow_urls)
        self._resolver = resolver
        self._socket_factory = socket_factory
        self._session: aiohttp.ClientSession | None = None
        self._session_resolver: AbstractResolver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        _handlers.add(self)

    async def __call__(self, payload: Any, call: Call) -> dict[str, Any]:
        """Perform the request; 429 (and 503 with Retry-After) raise RetryAfter (the
        job waits, no attempt used), other 5xx and connection errors raise
        HttpCallError (retried), a request that cannot succeed a PermanentError."""
        method, url_text, headers, data, timeout = parse_http_request(payload)
        url = parse_url(url_text)
        self.urls.check(url)
        limit = min(timeout, call.timeout) if timeout is not None else call.timeout
        headers.setdefault("Idempotency-Key", call.job_id)
        shown = redact_url(str(url))
        try:
            async with asyncio.timeout(limit):
                return await self._exchange(method, url, headers, data)
        except TimeoutError:
            raise HttpCallError(
                f"{method} {shown}: no complete answer within {limit:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            why = redact_text(str(exc), self.policy.redact_headers)
            raise HttpCallError(f"{method} {shown} failed: {type(exc).__name__}: {why}") from exc

    async def _exchange(
        self, method: str, url: URL, headers: CIMultiDict[str], data: bytes | None
    ) -> dict[str, Any]:
        """Send the request and follow redirects as the policy allows."""
        session = self._session_now()
        first = origin(url)
        redirects = 0
        while True:
            async with session.request(
                method, url, headers=headers, data=data, allow_redirects=False
            ) as response:
                target = self._redirect_target(response, url)
                if target is None:
                    return await self._answer(response, url)
                await self._read_body(response, url)  # small; keeps the connection reusable
            if redirects == MAX_REDIRECTS:
                raise UrlRefused(
                    f"{redact_url(str(url))}: more than {MAX_REDIRECTS} redirects; stopped"
                )
            redirects += 1
            self.urls.check(target)
            log.debug(
                "redirect %d: %s -> %s", redirects, redact_url(str(url)), redact_url(str(target))
            )
            if origin(target) != first:
                headers = without_credentials(headers, self.policy.redact_headers)
            method, data, headers = _redirected(response.status, method, data, headers)
            url = target

    def _redirect_target(self, response: aiohttp.ClientResponse, url: URL) -> URL | None:
        """Where to go next, or None when this response is the answer."""
        if not self.policy.follow_redirects or response.status not in REDIRECT_STATUSES:
            return None
        location = response.headers.get("Location")
        if not location:
            return None
        try:
            target = str(url.join(URL(location)))
        except ValueError:
            target = ""  # parse_url says it is no http(s) URL
        try:
            return parse_url(target, "redirect target")
        except HttpPayloadError as exc:
            raise UrlRefused(f"{exc} (redirected from {redact_url(str(url))})") from None

    async def _answer(self, response: aiohttp.ClientResponse, url: URL) -> dict[str, Any]:
        status = response.status
        if status == 429 or status >= 500:
            preview = await response.content.read(ERROR_PREVIEW_BYTES)
            text = redact_text(_decode(preview, response.charset)[:200], self.policy.redact_headers)
            said = response.headers.get("Retry-After")
            message = f"HTTP {status} from {redact_url(str(url))}: {text}"
            wait = parse_retry_after(said, time.time())
            if status == 429 or (status == 503 and wait is not None):
                # The API said "slow down": not a failed attempt (throttling.py).
                raise RetryAfter(wait, message)
            raise HttpCallError(message)
        body = await self._read_body(response, url)
        return {
            "status": status,
            "headers": dict(response.headers),
            "body": _decode(body, response.charset),
        }

    async def _read_body(self, response: aiohttp.ClientResponse, url: URL) -> bytes:
        """The body, read in chunks; past ``max_response_bytes`` the connection
        is closed and ResponseTooLarge raised, so memory stays bounded."""
        limit = self.limits.max_response_bytes
        body = bytearray()
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            if len(body) + len(chunk) > limit:
                response.close()
                raise ResponseTooLarge(
                    f"response from {redact_url(str(url))} is larger than "
                    f"max_response_bytes ({limit} bytes); stopped reading"
                )
            body += chunk
        return bytes(body)

    def _session_now(self) -> aiohttp.ClientSession:
        """This process's session, made in the running event loop on first use."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            resolver = CheckedResolver(self.urls, self._resolver or aiohttp.DefaultResolver())
            options: dict[str, Any] = {}
            if self._socket_factory is not None:
                options["socket_factory"] = self._socket_factory
            connector = aiohttp.TCPConnector(
                limit=1, keepalive_timeout=KEEPALIVE_SECONDS, resolver=resolver, **options
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
                trust_env=False,
            )
            self._session_resolver = resolver
            self._loop = loop
        return self._session

    async def aclose(self) -> None:
        """Close the session (and its one connection) if this event loop owns it."""
        session, resolver, loop = self._session, self._session_resolver, self._loop
        self._session = self._session_resolver = self._loop = None
        if session is None or loop is not asyncio.get_running_loop():
            return  # made in an event loop that is gone: nothing left to close here
        await session.close()
        if resolver is not None:
            await resolver.close()


def _redirected(
    status: int, method: str, data: bytes | None, headers: CIMultiDict[str]
) -> tuple[str, bytes | None, CIMultiDict[str]]:
    """The next hop's method, body and headers: 303 (and 301/302 after a POST)
    turn into a GET without a body; 307 and 308 repeat the request."""
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        headers = CIMultiDict((k, v) for k, v in headers.items() if k.lower() != "content-type")
        return "GET", None, headers
    return method, data, headers


def _decode(body: bytes, charset: str | None) -> str:
    """Text in the response's charset (UTF-8 when absent or unknown)."""
    try:
        codec = codecs.lookup(charset).name if charset else "utf-8"
    except LookupError:
        codec = "utf-8"
    return body.decode(codec, errors="replace")


def shared_http_handler(
    policy: HttpPolicy | None = None, limits: Limits | None = None
) -> HttpHandler:
    """The process's handler for this policy: several ``http`` handler specs of
    one slot share it, and so share its one connection."""
    key = (
        policy if policy is not None else HttpPolicy(),
        limits if limits is not None else Limits(),
    )
    handler = _shared.get(key)
    if handler is None:
        handler = _shared[key] = HttpHandler(*key)
    return handler


async def close_http_session() -> None:
    """Close every http handler's session (a slot calls this when it stops)."""
    for handler in list(_handlers):
        await handler.aclose()
