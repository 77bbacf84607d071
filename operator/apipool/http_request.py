"""The ``http`` payload, checked field by field before anything is sent (pure).

Every refusal raises :class:`HttpPayloadError`, a :class:`PermanentError` (the
payload will not get better on a retry) that is also a ``ValueError``. Messages
name the field and, for headers, the header's name; never a header's value.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from .errors import PermanentError
from .redact import header_names

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
"""Request headers a job cannot set: the target and the framing of the request
are the handler's business (and hop-by-hop headers mean nothing to the API)."""

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_URL = re.compile(r"[\x00-\x20\x7f]")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")

HttpRequest = tuple[str, str, CIMultiDict[str], bytes | None, float | None]
"""method, url, headers, body bytes (or None), timeout in seconds (or None)."""


class HttpPayloadError(PermanentError, ValueError):
    """An ``http`` payload (or a redirect it led to) that cannot be sent."""


def parse_url(text: object, what: str = "http payload: 'url'") -> URL:
    """``text`` as a URL the handler can call; ``what`` starts the error message."""
    if not isinstance(text, str) or not text[:8].lower().startswith(("http://", "https://")):
        raise HttpPayloadError(f"{what} must be an http(s) URL")
    if _BAD_URL.search(text):
        raise HttpPayloadError(f"{what} contains whitespace or control characters")
    try:
        url = URL(text)
        port = url.port
    except ValueError:
        raise HttpPayloadError(f"{what} is not a valid URL") from None
    host = url.raw_host
    if not host:
        raise HttpPayloadError(f"{what} has no host")
    if not _valid_host(host):
        raise HttpPayloadError(f"{what} has an invalid host")
    if not port:
        raise HttpPayloadError(f"{what} has an invalid port")
    return url.with_fragment(None)


def _valid_host(host: str) -> bool:
    """A DNS name or an IP address in its one canonical form: a name whose last
    label looks numeric (``2130706433``, ``127.1``, ``0x7f.1``) would be read
    as an address by some resolvers, so it is no valid host."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(host):
        return False
    last = host.rstrip(".").rpartition(".")[2]
    return not (last.isdigit() or last.startswith("0x"))


def check_headers(raw: Mapping[Any, Any]) -> CIMultiDict[str]:
    """The payload's headers; each name a token a job may set, each value a
    string without line breaks, no name twice (names are case-insensitive)."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in raw.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise HttpPayloadError(
                f"http payload: header name {str(name)[:40]!r} is not a valid HTTP token"
            )
        if name.lower() in FORBIDDEN_HEADERS:
            raise HttpPayloadError(
                f"http payload: header {name!r} cannot be set by a job (the handler manages it)"
            )
        if not isinstance(value, str):
            raise HttpPayloadError(
                f"http payload: header {name!r} must be a string, not {type(value).__name__}"
            )
        if _BAD_VALUE.search(value):
            raise HttpPayloadError(
                f"http payload: header {name!r} contains a line break or control character"
            )
        if name in headers:
            raise HttpPayloadError(
                f"http payload: header {name!r} is given twice (names are case-insensitive)"
            )
        headers[name] = value
    return headers


def _body(body: Any, headers: CIMultiDict[str]) -> bytes | None:
    if body is None:
        return None
    if isinstance(body, str):
        return body.encode()
    try:
        data = json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError):
        raise HttpPayloadError("http payload: 'body' is not JSON-encodable") from None
    headers.setdefault("Content-Type", "application/json")
    return data


def _timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise HttpPayloadError("http payload: 'timeout' must be a positive number of seconds")
    return float(timeout)


def parse_http_request(payload: Any) -> HttpRequest:
    """Check an http payload: ``method``, ``url``, optional ``headers``, ``body``, ``timeout``."""
    if not isinstance(payload, Mapping):
        raise HttpPayloadError("http payload must be an object with 'method' and 'url'")
    method = str(payload.get("method", "GET")).upper()
    if method not in HTTP_METHODS:
        raise HttpPayloadError(f"http payload: unsupported method {method[:20]!r}")
    url_text = payload.get("url")
    url = parse_url(url_text)
    raw_headers = payload.get("headers")
    if raw_headers is None:
        raw_headers = {}
    if not isinstance(raw_headers, Mapping):
        raise HttpPayloadError("http payload: 'headers' must be an object")
    headers = check_headers(raw_headers)
    if url.user is not None and "Authorization" in headers:
        raise HttpPayloadError(
            "http payload: give credentials in the 'url' or in an Authorization header, not both"
        )
    data = _body(payload.get("body"), headers)
    assert isinstance(url_text, str)  # parse_url checked it
    return method, url_text, headers, data, _timeout(payload.get("timeout"))


def without_credentials(headers: CIMultiDict[str], extra: Iterable[str] = ()) -> CIMultiDict[str]:
    """A copy of ``headers`` without the ones that carry credentials (the
    redacted names: Authorization, Cookie, X-Api-Key, ... and ``extra``)."""
    secret = header_names(extra)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in secret)
