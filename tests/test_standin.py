"""The stand-in API: connection counting, the over-limit accounting and the routes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from apipool.errors import ConfigError
from apipool.standin import StandInApi, StandInThread, run_in_thread

pytestmark = pytest.mark.unit


# -- helpers -------------------------------------------------------------------


async def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.005)


async def holds_for(check: Callable[[], bool], seconds: float) -> bool:
    """Whether ``check`` stays true for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not check():
            return False
        await asyncio.sleep(0.01)
    return check()


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def send(api: StandInApi, target: str, *, method: str = "GET", body: bytes = b"") -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, json.loads(body)


async def close(conn: Conn) -> None:
    conn[1].close()
    await conn[1].wait_closed()


# -- counting --------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_third_client_over_limit_two_gets_429() -> None:
    async with StandInApi(2) as api:
        first = await send(api, "/work?ms=300")
        second = await send(api, "/work?ms=300")
        await eventually(lambda: api.stats().active == 2, what="two active")
        third = await send(api, "/work?ms=300")
        status, headers, body = await read_response(third[0])
        assert status == 429
        assert headers["connection"] == "close"
        assert body == {"error": "over limit", "active": 3, "limit": 2}
        for conn in (first, second):
            status, _, body = await read_response(conn[0])
            assert status == 200
            assert body["ok"] is True
            assert body["ms"] == 300.0
        stats = api.stats()
        assert stats.max_concurrency == 3
        assert stats.over_limit_seconds > 0
        assert stats.rejected_total == 1
        assert stats.ok_total == 2
        assert stats.requests_total == 3
        assert len(stats.over_limit_events) == 1
        assert stats.over_limit_events[0]["peak"] == 3
        assert stats.over_limit_events[0]["end"] is None  # the rejected client is still open
        await close(third)
        await eventually(lambda: api.stats().active == 2, what="rejected client gone")
        event = api.stats().over_limit_events[0]
        assert event["end"] is not None
        assert event["end"] > event["start"]
        for conn in (first, second):
            await close(conn)
        await eventually(lambda: api.stats().active == 0, what="all gone")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_connection_stays_counted_until_client_closes() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=0")
        status, _, body = await read_response(conn[0])
        assert status == 200
        assert body["active"] == 1
        # The response is written; the connection is still open, so still counted.
        assert await holds_for(lambda: api.stats().active == 1, 0.3)
        await close(conn)
        await eventually(lambda: api.stats().active == 0, what="close seen")
        assert api.stats().over_limit_seconds == 0


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_client_leaving_mid_call_is_uncounted_at_once() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=10000")
        await eventually(lambda: api.stats().active == 1, what="request counted")
        started = time.monotonic()
        await close(conn)
        await eventually(lambda: api.stats().active == 0, what="close seen")
        assert time.monotonic() - started < 5
        stats = api.stats()
        assert stats.ok_total == 0
        assert stats.useful_seconds == 0


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_second_request_on_same_connection_counts_once() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=0")
        assert (await read_response(conn[0]))[0] == 200
        conn[1].write(b"GET /work?ms=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        await conn[1].drain()
        assert await holds_for(lambda: api.stats().active == 1, 0.2)
        stats = api.stats()
        assert stats.requests_total == 1
        assert stats.max_concurrency == 1
        await close(conn)
        await eventually(lambda: api.stats().active == 0, what="close seen")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_linger_timeout_closes_an_idle_connection() -> None:
    async with StandInApi(1, linger_timeout=0.2) as api:
        reader, writer = await send(api, "/work?ms=0")
        assert (await read_response(reader))[0] == 200
        await eventually(lambda: api.stats().active == 0, what="linger timeout")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # server closed it
        writer.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_sequential_requests_under_limit_never_go_over() -> None:
    async with StandInApi(1) as api:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(200):
                async with session.get(f"{api.url}/work", params={"ms": "0.5"}) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["ok"] is True
        await eventually(lambda: api.stats().active == 0, what="last close seen")
        stats = api.stats()
        assert stats.ok_total == 200
        assert stats.requests_total == 200
        assert stats.rejected_total == 0
        assert stats.max_concurrency == 1
        assert stats.over_limit_seconds == 0
        assert stats.over_limit_events == []
        assert stats.useful_seconds == pytest.approx(0.1)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_reconnect_right_after_close_is_not_over_limit() -> None:
    """A client that closes and reconnects at once must never look like two."""
    async with StandInApi(1) as api:
        for _ in range(300):
            conn = await send(api, "/work?ms=0")
            assert (await read_response(conn[0]))[0] == 200
            conn[1].close()  # no wait_closed: the next connect follows immediately
        await eventually(lambda: api.stats().active == 0, what="last close seen")
        stats = api.stats()
        assert stats.rejected_total == 0
        assert stats.over_limit_seconds == 0


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_post_with_body_and_default_ms() -> None:
    async with StandInApi(3, default_ms=20) as api:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"{api.url}/work", json={"x": "y" * 10000}) as resp:
                assert resp.status == 200
                assert await resp.json() == {"ok": True, "ms": 20.0, "active": 1}
            async with session.post(f"{api.url}/work?ms=abc", data=b"") as resp:
                assert resp.status == 400
        await eventually(lambda: api.stats().active == 0, what="closes seen")
        assert api.stats().useful_seconds == pytest.approx(0.02)


# -- time accounting -------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_busy_seconds_integrates_active_connections() -> None:
    async with StandInApi(4) as api:
        conns = [await send(api, "/work?ms=0") for _ in range(2)]
        for conn in conns:
            assert (await read_response(conn[0]))[0] == 200
        api.reset()  # both stay counted across the reset
        began = time.monotonic()
        assert await holds_for(lambda: api.stats().active == 2, 0.4)
        stats = api.stats(include_samples=False)
        wall = time.monotonic() - began
        assert stats.requests_total == 0
        assert stats.max_concurrency == 2
        assert 0.4 <= stats.elapsed_seconds <= wall + 0.05
        assert stats.busy_seconds == pytest.approx(2 * stats.elapsed_seconds, rel=1e-6)
        assert stats.utilisation == pytest.approx(0.5, rel=1e-6)
        assert stats.samples == []
        for conn in conns:
            await close(conn)
        await eventually(lambda: api.stats().active == 0, what="closes seen")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_busy_seconds_is_capped_at_the_limit() -> None:
    async with StandInApi(1) as api:
        ok = await send(api, "/work?ms=0")
        assert (await read_response(ok[0]))[0] == 200
        rejected = await send(api, "/work?ms=0")
        assert (await read_response(rejected[0]))[0] == 429
        api.reset()
        assert await holds_for(lambda: api.stats().active == 2, 0.3)
        stats = api.stats()
        assert stats.busy_seconds == pytest.approx(stats.elapsed_seconds, rel=1e-6)
        assert stats.over_limit_seconds == pytest.approx(stats.elapsed_seconds, rel=1e-6)
        assert stats.over_limit_events == [{"start": 0.0, "end": None, "peak": 2}]
        await close(rejected)
        await close(ok)
        await eventually(lambda: api.stats().active == 0, what="closes seen")
        samples = api.stats().samples
        assert samples[0] == (0.0, 2)
        assert [n for _, n in samples[-2:]] == [1, 0]


# -- routes ----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_stats_endpoint_is_not_counted_nor_limited() -> None:
    async with StandInApi(1) as api:
        held = await send(api, "/work?ms=0")
        assert (await read_response(held[0]))[0] == 200
        for query in ("", "?samples=0"):
            reader, writer = await send(api, "/stats" + query)
            status, _, body = await read_response(reader)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()
            assert status == 200
            assert body["active"] == 1
            assert body["limit"] == 1
            assert body["requests_total"] == 1
            assert body["rejected_total"] == 0
            assert body["over_limit_seconds"] == 0
            assert (body["samples"] == []) == (query != "")
        assert api.stats().max_concurrency == 1
        await close(held)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_unknown_path_is_404() -> None:
    async with StandInApi(2) as api:
        conn = await send(api, "/nope")
        status, _, body = await read_response(conn[0])
        assert status == 404
        assert body["error"] == "not found"
        conn2 = await send(api, "/work", method="DELETE")
        assert (await read_response(conn2[0]))[0] == 404
        assert api.stats().ok_total == 0
        await close(conn)
        await close(conn2)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "head",
    [
        b"garbage\r\n\r\n",
        b"GET /work\r\n\r\n",
        b"GET work HTTP/1.1\r\n\r\n",
        b"GET /work HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /work HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
        b"POST /work HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
async def test_malformed_request_is_400_and_closed(head: bytes) -> None:
    async with StandInApi(1) as api:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(head)
        await writer.drain()
        status, _, _ = await read_response(reader)
        assert status == 400
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        stats = api.stats()
        assert stats.active == 0
        assert stats.requests_total == 0


# -- lifecycle -------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_stop_closes_open_connections() -> None:
    api = StandInApi(2)
    await api.start()
    reader, writer = await send(api, "/work?ms=0")
    assert (await read_response(reader))[0] == 200
    await api.stop()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert api.stats().active == 0
    with pytest.raises(RuntimeError):
        _ = api.port


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_hundreds_of_simultaneous_connections() -> None:
    async with StandInApi(500, default_ms=200) as api:
        conns = await asyncio.gather(*(send(api, "/work") for _ in range(300)))
        answers = await asyncio.gather(*(read_response(c[0]) for c in conns))
        assert all(status == 200 for status, _, _ in answers)
        assert api.stats().max_concurrency == 300
        await asyncio.gather(*(close(c) for c in conns))
        await eventually(lambda: api.stats().active == 0, what="closes seen")
        assert api.stats().over_limit_seconds == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": 0}, {"limit": 1, "default_ms": -1}, {"limit": 1, "linger_timeout": 0}],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        StandInApi(**kwargs)


def _http(port: int, target: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return sock, data


def _poll(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.timeout(30)
def test_run_in_thread_from_sync_code() -> None:
    with run_in_thread(1, default_ms=0) as api:
        assert api.url == f"http://127.0.0.1:{api.port}"
        sock, data = _http(api.port, "/work")
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert api.stats().active == 1  # read from this thread while the loop runs
        sock.close()
        _poll(lambda: api.stats().active == 0)
        api.reset()
        assert api.stats().requests_total == 0
        sock, _ = _http(api.port, "/work")
    # The server closed the connection it still had open when it stopped.
    assert sock.recv(10) == b""
    sock.close()


@pytest.mark.timeout(30)
def test_stand_in_thread_reports_a_busy_port() -> None:
    with run_in_thread(1) as api:
        clash = StandInThread(1, port=api.port)
        with pytest.raises(OSError, match="address already in use"):
            clash.start()
