"""Keeping secrets out of logs and dead letters (pure).

What is redacted:

- in a URL: the password of its userinfo and every query value (the names
  stay: ``?api_key=[redacted]&page=[redacted]``);
- in headers: the values of ``defaults.REDACT_HEADERS`` (``Authorization``,
  ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie``, ``X-Api-Key``) and of any
  further names a pool configures, compared case-insensitively;
- in free text (an exception's message, a raw envelope that could not be
  parsed): every URL as above, and ``"<header>": "<value>"`` pairs of those
  header names as JSON writes them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from . import defaults

REDACTED = "[redacted]"
_MARK = "redacted0marker"
"""Stands in for REDACTED while a URL is split (its brackets read as an IPv6 host)."""
_URL = re.compile(r"""\bhttps?://[^\s"'<>\\]+""", re.IGNORECASE)


def header_names(extra: Iterable[str] = ()) -> frozenset[str]:
    """The lower-cased names whose values are redacted."""
    return frozenset(n.lower() for n in (*defaults.REDACT_HEADERS, *extra))


def redact_url(url: str) -> str:
    """``url`` without its userinfo password and query values; redacting an
    already redacted URL changes nothing."""
    try:
        parts = urlsplit(url.replace(REDACTED, _MARK))
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{user}@{host}"
        query = "&".join(
            f"{name}={REDACTED}" for name, _ in parse_qsl(parts.query, keep_blank_values=True)
        )
        if parts.query and not query:
            query = REDACTED
        return urlunsplit((parts.scheme, netloc, parts.path, query, "")).replace(_MARK, REDACTED)
    except ValueError:  # a malformed port or host: say nothing of it
        return REDACTED


def redact_headers(headers: Mapping[str, Any], extra: Iterable[str] = ()) -> dict[str, Any]:
    """A copy of ``headers`` with the secret ones' values replaced."""
    names = header_names(extra)
    return {k: (REDACTED if str(k).lower() in names else v) for k, v in headers.items()}


def redact_text(text: str, extra: Iterable[str] = ()) -> str:
    """Free text with its URLs and JSON-written secret headers redacted."""
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    names = "|".join(re.escape(n) for n in sorted(header_names(extra)))
    pair = re.compile(rf'("(?:{names})"\s*:\s*)"(?:[^"\\]|\\.)*"', re.IGNORECASE)
    return pair.sub(rf'\1"{REDACTED}"', text)


def redact_payload(payload: Any, extra: Iterable[str] = ()) -> Any:
    """A job payload fit for a dead letter: an ``http`` payload's secret
    headers and URL query values redacted; anything else as it is."""
    if not isinstance(payload, Mapping):
        return payload
    doc = dict(payload)
    headers = doc.get("headers")
    if isinstance(headers, Mapping):
        doc["headers"] = redact_headers(headers, extra)
    url = doc.get("url")
    if isinstance(url, str):
        doc["url"] = redact_url(url)
    return doc
