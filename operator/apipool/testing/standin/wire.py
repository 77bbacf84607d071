"""The stand-in's HTTP/1.1 on the wire: parse a request head, write a whole response.

Pure functions on bytes, no I/O: :mod:`.connection` feeds them what it reads
and writes what they return.
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus
from typing import Any, NamedTuple

__all__ = [
    "MAX_BODY",
    "MAX_HEAD",
    "BadRequest",
    "Head",
    "header_value_ok",
    "parse_head",
    "response",
]

MAX_HEAD = 64 * 1024
"""Longest request head accepted; a longer one is answered 400."""
MAX_BODY = 16 * 1024 * 1024
"""Largest ``Content-Length`` accepted."""


class BadRequest(Exception):
    """A malformed request head; the message says what is wrong with it."""


class Head(NamedTuple):
    """What the server needs from a request head."""

    method: str
    target: str
    length: int
    """``Content-Length``: body bytes to skip before the next request head."""
    keep_alive: bool
    """Whether the client wants the connection kept open after the response."""


def seconds(value: float) -> str:
    """``60.0`` -> ``"60"``, ``0.25`` -> ``"0.25"`` (millisecond precision)."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def header_value_ok(value: str) -> bool:
    """Whether ``value`` can be sent verbatim as a header value: printable ASCII
    and tabs only (no line break could end the header early)."""
    return all(char == "\t" or " " <= char <= "~" for char in value)


def response(
    status: int,
    payload: dict[str, Any],
    keep_alive: float | None = None,
    *,
    retry_after: str | None = None,
) -> bytes:
    """A whole response; ``keep_alive`` is the idle timeout to announce, ``None`` to close;
    ``retry_after``, if given, is sent verbatim as the ``Retry-After`` header."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    reason = HTTPStatus(status).phrase
    if keep_alive is None:
        connection = "Connection: close\r\n"
    else:
        connection = "Connection: keep-alive\r\n"
        if math.isfinite(keep_alive):
            connection += f"Keep-Alive: timeout={seconds(keep_alive)}\r\n"
    extra = "" if retry_after is None else f"Retry-After: {retry_after}\r\n"
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{connection}{extra}\r\n"
    )
    return head.encode("ascii") + body


def _request_line(line: str) -> list[str]:
    parts = line.split(" ")
    if (
        len(parts) != 3
        or not parts[0].isalpha()
        or not parts[1].startswith("/")
        or not parts[2].startswith("HTTP/1.")
    ):
        raise BadRequest("malformed request line")
    return parts


def _content_length(value: str) -> int:
    try:
        length = int(value.strip())
    except ValueError as exc:
        raise BadRequest("bad Content-Length") from exc
    if not 0 <= length <= MAX_BODY:
        raise BadRequest("bad Content-Length")
    return length


def parse_head(head: bytes) -> Head:
    """Parse a request head (without its final blank line); raise :class:`BadRequest`.

    Keep-alive follows HTTP/1.1: ``Connection: close`` closes; HTTP/1.0 closes
    unless it says ``Connection: keep-alive``.
    """
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes anything
        raise BadRequest("undecodable head") from exc
    lines = text.split("\r\n")
    method, target, version = _request_line(lines[0])
    length = 0
    options: set[str] = set()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest("malformed header line")
        key = name.strip().lower()
        if key == "content-length":
            length = _content_length(value)
        elif key == "transfer-encoding" and value.strip().lower() != "identity":
            raise BadRequest("Transfer-Encoding is not supported; send Content-Length")
        elif key == "connection":
            options.update(token.strip().lower() for token in value.split(","))
    if "close" in options:
        keep_alive = False
    elif version == "HTTP/1.0":
        keep_alive = "keep-alive" in options
    else:
        keep_alive = True
    return Head(method, target, length, keep_alive)
