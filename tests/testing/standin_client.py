"""A bare HTTP/1.1 client for the stand-in's tests: raw bytes, so every edge can be staged."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import IO, Any

from apipool.testing.polling import WaitTimeout, async_wait_for
from apipool.testing.standin import StandInApi, StandInStats

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Response = tuple[int, dict[str, str], Any]


def assert_stats(stats: StandInStats, **expected: object) -> None:
    """Each named field of ``stats`` equals its expected value (``pytest.approx`` allowed)."""
    got = {name: getattr(stats, name) for name in expected}
    assert got == expected


async def stays(check: Callable[[], bool], seconds: float) -> bool:
    """Whether ``check`` holds throughout ``seconds`` (waiting for it to fail times out)."""
    try:
        await async_wait_for(lambda: not check(), seconds, interval=0.01)
    except WaitTimeout:
        return True
    return False


def request(
    target: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    headers: tuple[str, ...] = (),
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}", "Host: x", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def ask(conn: Conn, target: str, **kwargs: Any) -> None:
    """Send one more request on an open connection."""
    conn[1].write(request(target, **kwargs))
    await conn[1].drain()


async def send(api: StandInApi, target: str, **kwargs: Any) -> Conn:
    """Open a new connection and send one request on it."""
    conn = await asyncio.open_connection("127.0.0.1", api.port)
    await ask(conn, target, **kwargs)
    return conn


def _parse_headers(lines: list[str]) -> dict[str, str]:
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return headers


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = _parse_headers(lines[1:])
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, json.loads(body)


async def status_of(reader: asyncio.StreamReader) -> int:
    """The status of the next response (its body read and dropped)."""
    return (await read_response(reader))[0]


async def no_answer(reader: asyncio.StreamReader, seconds: float = 0.3) -> bool:
    """Whether nothing at all arrives (neither data nor EOF) for ``seconds``."""
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return True
    return False


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (EOF, nothing more) within 5 s."""
    return await asyncio.wait_for(reader.read(), 5) == b""


async def close(conn: Conn) -> None:
    conn[1].close()
    await conn[1].wait_closed()


def read_sync(rfile: IO[bytes]) -> Response:
    """:func:`read_response` on a blocking socket's file."""
    status = int(rfile.readline().split()[1])
    lines = []
    while (line := rfile.readline()) not in (b"\r\n", b""):
        lines.append(line.decode())
    headers = _parse_headers(lines)
    return status, headers, json.loads(rfile.read(int(headers["content-length"])))


def http_get(port: int, target: str) -> tuple[socket.socket, bytes]:
    """A blocking GET; the socket (still open) and all the bytes of the response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return sock, data
