"""The stand-in API: keep-alive, the two counts, the over-limit accounting and the routes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import IO, Any

import aiohttp
import pytest

from apipool.errors import ConfigError
from apipool.testing.standin import StandInApi, StandInThread, run_in_thread

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


async def no_answer(reader: asyncio.StreamReader, seconds: float = 0.3) -> bool:
    """Whether nothing at all arrives (neither data nor EOF) for ``seconds``."""
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return True
    return False


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
        assert headers["connection"] == "keep-alive"
        assert body == {"error": "over limit", "active": 3, "limit": 2}
        assert api.stats().in_flight == 2  # the 429 was never in flight
        for conn in (first, second):
            status, _, body = await read_response(conn[0])
            assert status == 200
            assert body["ok"] is True
            assert body["ms"] == 300.0
        stats = api.stats()
        assert stats.max_concurrency == 3
        assert stats.max_in_flight == 2
        assert stats.over_limit_seconds > 0
        assert stats.rejected_total == 1
        assert stats.ok_total == 2
        assert stats.requests_total == 3
        assert stats.connections_total == 3
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
async def test_idle_kept_alive_connection_still_counts_against_the_limit() -> None:
    async with StandInApi(1) as api:
        idle = await send(api, "/work?ms=0")
        status, headers, body = await read_response(idle[0])
        assert status == 200
        assert headers["connection"] == "keep-alive"
        assert body["active"] == 1
        # Answered, still open: counted as a connection, but nothing in flight.
        assert await holds_for(lambda: api.stats().active == 1, 0.3)
        assert api.stats().in_flight == 0
        other = await send(api, "/work?ms=0")
        status, headers, body = await read_response(other[0])
        assert status == 429
        assert headers["connection"] == "keep-alive"
        assert body == {"error": "over limit", "active": 2, "limit": 1}
        # While the rejected one stays open, the idle one is over the limit too,
        # and asking again does not count its connection twice.
        await ask(idle, "/work?ms=0")
        status, _, body = await read_response(idle[0])
        assert status == 429
        assert body["active"] == 2
        stats = api.stats()
        assert stats.active == 2
        assert stats.max_concurrency == 2
        assert stats.in_flight == 0
        assert stats.max_in_flight == 1
        assert stats.connections_total == 2
        assert stats.requests_total == 3
        assert stats.rejected_total == 2
        assert stats.over_limit_seconds > 0
        await close(other)
        await eventually(lambda: api.stats().active == 1, what="rejected client gone")
        assert api.stats().over_limit_events[0]["end"] is not None
        await ask(idle, "/work?ms=0")
        status, _, body = await read_response(idle[0])
        assert status == 200
        assert body["active"] == 1
        await close(idle)
        await eventually(lambda: api.stats().active == 0, what="close seen")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_client_leaving_mid_call_is_uncounted_at_once() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=10000")
        await eventually(lambda: api.stats().in_flight == 1, what="request in flight")
        assert api.stats().active == 1
        started = time.monotonic()
        await close(conn)
        await eventually(lambda: api.stats().active == 0, what="close seen")
        assert time.monotonic() - started < 5
        stats = api.stats()
        assert stats.in_flight == 0
        assert stats.ok_total == 0
        assert stats.useful_seconds == 0
        assert stats.nominal_seconds == 0


def _read_sync(rfile: IO[bytes]) -> tuple[int, dict[str, str], Any]:
    status = int(rfile.readline().split()[1])
    headers = {}
    while (line := rfile.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, json.loads(rfile.read(int(headers["content-length"])))


@pytest.mark.timeout(30)
def test_keep_alive_serves_many_requests_on_one_raw_socket() -> None:
    with run_in_thread(1, default_ms=0) as api:
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            rfile = sock.makefile("rb")
            for i in range(5):
                sock.sendall(request(f"/work?ms={i}"))
                status, headers, body = _read_sync(rfile)
                assert status == 200
                assert body == {"ok": True, "ms": float(i), "active": 1}
                assert headers["connection"] == "keep-alive"
                assert headers["keep-alive"] == "timeout=60"
            stats = api.stats()
            assert stats.active == 1
            assert stats.in_flight == 0
            assert stats.connections_total == 1
            assert stats.requests_total == 5
            assert stats.ok_total == 5
            assert stats.max_concurrency == 1
            assert stats.max_in_flight == 1
            assert stats.nominal_seconds == pytest.approx(0.010)
            rfile.close()
        _poll(lambda: api.stats().active == 0)
        assert api.stats().over_limit_seconds == 0


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_aiohttp_keep_alive_connector_reuses_one_connection() -> None:
    async with StandInApi(1) as api:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(20):
                async with session.get(f"{api.url}/work", params={"ms": "2"}) as resp:
                    assert resp.status == 200
                    assert resp.headers["Connection"] == "keep-alive"
                    assert await resp.json() == {"ok": True, "ms": 2.0, "active": 1}
            assert api.stats().active == 1  # still open, idle in the client's pool
        await eventually(lambda: api.stats().active == 0, what="session closed")
        stats = api.stats()
        assert stats.connections_total == 1
        assert stats.requests_total == 20
        assert stats.ok_total == 20
        assert stats.rejected_total == 0
        assert stats.max_concurrency == 1
        assert stats.max_in_flight == 1
        assert stats.over_limit_seconds == 0
        assert stats.over_limit_events == []
        assert stats.nominal_seconds == pytest.approx(0.040)
        assert stats.useful_seconds >= stats.nominal_seconds - 1e-6


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_pipelined_requests_are_answered_in_order() -> None:
    async with StandInApi(2) as api:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        # One send: a POST whose body must not be taken for a head, a stray
        # CRLF between requests, a quick one and a 404.
        writer.write(
            request("/work?ms=50", method="POST", body=b"GET /nope HTTP/1.1\r\n\r\n")
            + b"\r\n"
            + request("/work?ms=0")
            + request("/nope")
        )
        await writer.drain()
        answers = [await read_response(reader) for _ in range(3)]
        assert [(status, body.get("ms")) for status, _, body in answers] == [
            (200, 50.0),
            (200, 0.0),
            (404, None),
        ]
        assert all(headers["connection"] == "keep-alive" for _, headers, _ in answers)
        # A body split across sends, with the next request glued to its end.
        head_and_half = request("/work?ms=0", method="POST", body=b"abcdef")[:-3]
        writer.write(head_and_half)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"def" + request("/work?ms=1"))
        await writer.drain()
        assert [(await read_response(reader))[2]["ms"] for _ in range(2)] == [0.0, 1.0]
        stats = api.stats()
        assert stats.connections_total == 1
        assert stats.requests_total == 5
        assert stats.ok_total == 4
        assert stats.max_in_flight == 1  # served one after the other
        assert stats.in_flight == 0
        assert stats.active == 1
        await close((reader, writer))
        await eventually(lambda: api.stats().active == 0, what="close seen")


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_thousands_of_pipelined_requests_in_one_send() -> None:
    async with StandInApi(1) as api:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(request("/nope") * 3000 + request("/work?ms=0"))
        await writer.drain()
        for _ in range(3000):
            assert (await read_response(reader))[0] == 404
        assert (await read_response(reader))[0] == 200
        stats = api.stats()
        assert stats.requests_total == 3001
        assert stats.connections_total == 1
        assert stats.ok_total == 1
        await close((reader, writer))


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("HTTP/1.1", None, True),
        ("HTTP/1.1", "keep-alive", True),
        ("HTTP/1.1", "close", False),
        ("HTTP/1.1", "Keep-Alive, Close", False),
        ("HTTP/1.0", None, False),
        ("HTTP/1.0", "Keep-Alive", True),
    ],
)
async def test_connection_header_decides_keep_alive(
    version: str, connection: str | None, keep_alive: bool
) -> None:
    async with StandInApi(1, default_ms=0) as api:
        headers = () if connection is None else (f"Connection: {connection}",)
        conn = await send(api, "/work", version=version, headers=headers)
        status, got, _ = await read_response(conn[0])
        assert status == 200
        assert got["connection"] == ("keep-alive" if keep_alive else "close")
        assert ("keep-alive" in got) == keep_alive
        await ask(conn, "/work")
        if keep_alive:
            assert (await read_response(conn[0]))[0] == 200
        else:
            assert await no_answer(conn[0])  # discarded, and not closed either
        assert api.stats().requests_total == (2 if keep_alive else 1)
        await close(conn)
        await eventually(lambda: api.stats().active == 0, what="close seen")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_connection_close_request_stays_counted_until_the_client_closes() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=0", headers=("Connection: close",))
        status, headers, body = await read_response(conn[0])
        assert status == 200
        assert headers["connection"] == "close"
        assert body["active"] == 1
        assert await holds_for(lambda: api.stats().active == 1, 0.3)
        assert api.stats().in_flight == 0
        await close(conn)
        await eventually(lambda: api.stats().active == 0, what="close seen")
        stats = api.stats()
        assert stats.over_limit_seconds == 0
        assert stats.samples[-1][1:] == (0, 0)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_linger_timeout_closes_a_connection_that_asked_to_close() -> None:
    async with StandInApi(1, linger_timeout=0.2) as api:
        reader, writer = await send(api, "/work?ms=0", headers=("Connection: close",))
        assert (await read_response(reader))[0] == 200
        await eventually(lambda: api.stats().active == 0, what="linger timeout")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # server closed it
        writer.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_idle_timeout_closes_an_idle_kept_alive_connection() -> None:
    async with StandInApi(1, idle_timeout=0.2) as api:
        reader, writer = await send(api, "/work?ms=0")
        status, headers, _ = await read_response(reader)
        assert status == 200
        assert headers["keep-alive"] == "timeout=0.2"
        assert api.stats().active == 1
        began = time.monotonic()
        await eventually(lambda: api.stats().active == 0, what="idle timeout")
        assert time.monotonic() - began >= 0.15
        assert await asyncio.wait_for(reader.read(), 5) == b""  # server closed it
        writer.close()
        # A connection that never sends a request is closed too, never counted.
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert api.stats().connections_total == 1


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_idle_timeout_spares_a_long_request_and_restarts_after_each() -> None:
    async with StandInApi(1, idle_timeout=0.3) as api:
        conn = await send(api, "/work?ms=600")
        assert (await read_response(conn[0]))[0] == 200
        for _ in range(4):
            await asyncio.sleep(0.15)
            await ask(conn, "/work?ms=0")
            assert (await read_response(conn[0]))[0] == 200
        # A slow body: the request began with its head, so the connection is not idle.
        conn[1].write(request("/work?ms=0", method="POST", body=b"abcdef")[:-3])
        await asyncio.sleep(0.5)
        conn[1].write(b"def")
        assert (await read_response(conn[0]))[0] == 200
        stats = api.stats()
        assert stats.connections_total == 1
        assert stats.ok_total == 6
        assert stats.active == 1
        await close(conn)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_rejected_request_body_is_skipped_on_a_kept_alive_connection() -> None:
    async with StandInApi(1) as api:
        first = await send(api, "/work?ms=0")
        assert (await read_response(first[0]))[0] == 200
        body = b"GET /nope HTTP/1.1\r\n\r\n" * 300
        second = await send(api, "/work?ms=0", method="POST", body=body)
        assert (await read_response(second[0]))[0] == 429
        await close(first)
        await eventually(lambda: api.stats().active == 1, what="first gone")
        await ask(second, "/work?ms=0")
        status, _, answer = await read_response(second[0])
        assert status == 200
        assert answer["active"] == 1
        assert await no_answer(second[0], 0.1)  # nothing from the skipped body
        assert api.stats().requests_total == 3
        await close(second)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_sequential_requests_under_limit_never_go_over() -> None:
    async with StandInApi(1) as api:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(200):
                async with session.get(f"{api.url}/work", params={"ms": "0.5"}) as resp:
                    assert resp.status == 200
                    assert resp.headers["Connection"] == "close"
                    assert (await resp.json())["ok"] is True
        await eventually(lambda: api.stats().active == 0, what="last close seen")
        stats = api.stats()
        assert stats.ok_total == 200
        assert stats.requests_total == 200
        assert stats.connections_total == 200
        assert stats.rejected_total == 0
        assert stats.max_concurrency == 1
        assert stats.over_limit_seconds == 0
        assert stats.over_limit_events == []
        assert stats.nominal_seconds == pytest.approx(0.1)
        assert stats.useful_seconds >= stats.nominal_seconds - 1e-6


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
        stats = api.stats()
        assert stats.nominal_seconds == pytest.approx(0.02)
        assert stats.useful_seconds >= stats.nominal_seconds - 1e-6


# -- time accounting -------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_in_flight_counts_requests_being_served() -> None:
    async with StandInApi(3) as api:
        idle = await send(api, "/work?ms=0")
        assert (await read_response(idle[0]))[0] == 200
        working = [await send(api, "/work?ms=400") for _ in range(2)]
        await eventually(lambda: api.stats().in_flight == 2, what="two in flight")
        assert api.stats().active == 3
        for conn in working:
            assert (await read_response(conn[0]))[0] == 200
        stats = api.stats()
        assert stats.in_flight == 0
        assert stats.active == 3
        assert stats.max_in_flight == 2
        assert stats.max_concurrency == 3
        assert stats.samples[0] == (0.0, 0, 0)
        assert max(f for _, _, f in stats.samples) == 2
        assert all(f <= a for _, a, f in stats.samples)
        for conn in (idle, *working):
            await close(conn)
        await eventually(lambda: api.stats().active == 0, what="closes seen")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_busy_seconds_follows_in_flight_not_idle_connections() -> None:
    async with StandInApi(4) as api:
        conns = [await send(api, "/work?ms=0") for _ in range(2)]
        for conn in conns:
            assert (await read_response(conn[0]))[0] == 200
        api.reset()  # both stay counted across the reset
        assert await holds_for(lambda: api.stats().active == 2, 0.3)
        stats = api.stats(include_samples=False)
        assert stats.requests_total == 0
        assert stats.max_concurrency == 2
        assert stats.in_flight == 0
        assert stats.busy_seconds == 0.0  # open but idle: no work
        assert stats.utilisation == 0.0
        assert stats.samples == []
        for conn in conns:
            await ask(conn, "/work?ms=10000")
        await eventually(lambda: api.stats().in_flight == 2, what="two in flight")
        api.reset()  # both stay in flight across the reset
        began = time.monotonic()
        await asyncio.sleep(0.3)
        stats = api.stats(include_samples=False)
        wall = time.monotonic() - began
        assert stats.in_flight == stats.max_in_flight == 2
        assert 0.3 <= stats.elapsed_seconds <= wall + 0.05
        assert stats.busy_seconds == pytest.approx(2 * stats.elapsed_seconds, rel=1e-6)
        assert stats.utilisation == pytest.approx(0.5, rel=1e-6)
        for conn in conns:
            await close(conn)
        await eventually(lambda: api.stats().active == 0, what="closes seen")
        stats = api.stats()
        assert stats.in_flight == 0
        assert stats.ok_total == 0
        assert stats.useful_seconds == 0
        frozen = stats.busy_seconds
        await asyncio.sleep(0.1)
        assert api.stats().busy_seconds == frozen


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_idle_connections_over_the_limit_are_over_limit_but_not_busy() -> None:
    async with StandInApi(1) as api:
        ok = await send(api, "/work?ms=0")
        assert (await read_response(ok[0]))[0] == 200
        rejected = await send(api, "/work?ms=0")
        assert (await read_response(rejected[0]))[0] == 429
        api.reset()
        assert await holds_for(lambda: api.stats().active == 2, 0.3)
        stats = api.stats()
        assert stats.in_flight == 0
        assert stats.busy_seconds == 0.0
        assert stats.over_limit_seconds == pytest.approx(stats.elapsed_seconds, rel=1e-6)
        assert stats.over_limit_events == [{"start": 0.0, "end": None, "peak": 2}]
        await close(rejected)
        await close(ok)
        await eventually(lambda: api.stats().active == 0, what="closes seen")
        samples = api.stats().samples
        assert samples[0] == (0.0, 2, 0)
        assert [s[1:] for s in samples[-2:]] == [(1, 0), (0, 0)]


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_useful_seconds_is_the_service_time_of_200s() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=20")
        assert (await read_response(conn[0]))[0] == 200
        for target in ["/work?ms=20"] * 9 + ["/nope", "/work?ms=x"]:
            await ask(conn, target)
            await read_response(conn[0])
        other = await send(api, "/work?ms=500")
        assert (await read_response(other[0]))[0] == 429
        stats = api.stats()
        assert stats.ok_total == 10
        assert stats.nominal_seconds == pytest.approx(0.2)
        assert stats.nominal_seconds - 1e-6 <= stats.useful_seconds < stats.nominal_seconds + 0.15
        assert stats.useful_seconds <= stats.busy_seconds + 1e-6
        await close(other)
        await close(conn)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_useful_seconds_includes_the_servers_own_lateness() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=50")
        await eventually(lambda: api.stats().in_flight == 1, what="request in flight")
        # Block the server's event loop on purpose: its timer fires late.
        time.sleep(0.3)  # noqa: ASYNC251
        status, _, body = await read_response(conn[0])
        assert status == 200
        assert body["ms"] == 50.0
        stats = api.stats()
        assert stats.nominal_seconds == pytest.approx(0.05)
        assert stats.useful_seconds >= 0.3
        await close(conn)


# -- routes ----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_stats_endpoint_is_not_counted_nor_limited() -> None:
    async with StandInApi(1) as api:
        held = await send(api, "/work?ms=0")
        assert (await read_response(held[0]))[0] == 200
        for query in ("", "?samples=0"):
            reader, writer = await send(api, "/stats" + query)
            status, headers, body = await read_response(reader)
            assert headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()
            assert status == 200
            assert body["active"] == 1
            assert body["in_flight"] == 0
            assert body["limit"] == 1
            assert body["requests_total"] == 1
            assert body["connections_total"] == 1
            assert body["rejected_total"] == 0
            assert body["over_limit_seconds"] == 0
            if query:
                assert body["samples"] == []
            else:
                assert body["samples"]
                assert all(len(s) == 3 for s in body["samples"])
        assert api.stats().max_concurrency == 1
        await close(held)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_stats_on_a_counted_connection_closes_and_uncounts_it() -> None:
    async with StandInApi(2) as api:
        conn = await send(api, "/work?ms=0")
        assert (await read_response(conn[0]))[0] == 200
        await ask(conn, "/stats?samples=0")
        status, headers, body = await read_response(conn[0])
        assert status == 200
        assert headers["connection"] == "close"
        assert body["active"] == 1
        assert await asyncio.wait_for(conn[0].read(), 5) == b""
        await eventually(lambda: api.stats().active == 0, what="server close seen")
        assert api.stats().requests_total == 1
        conn[1].close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_unknown_path_is_404_and_keeps_the_connection() -> None:
    async with StandInApi(2) as api:
        conn = await send(api, "/nope")
        status, headers, body = await read_response(conn[0])
        assert status == 404
        assert headers["connection"] == "keep-alive"
        assert body["error"] == "not found"
        await ask(conn, "/work", method="DELETE")
        assert (await read_response(conn[0]))[0] == 404
        assert api.stats().ok_total == 0
        await ask(conn, "/work?ms=0")
        assert (await read_response(conn[0]))[0] == 200
        stats = api.stats()
        assert stats.ok_total == 1
        assert stats.requests_total == 3
        assert stats.connections_total == 1
        await close(conn)


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
        status, headers, _ = await read_response(reader)
        assert status == 400
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        stats = api.stats()
        assert stats.active == 0
        assert stats.requests_total == 0


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_malformed_head_on_a_counted_connection_closes_and_uncounts_it() -> None:
    async with StandInApi(1) as api:
        reader, writer = await send(api, "/work?ms=0")
        assert (await read_response(reader))[0] == 200
        writer.write(b"garbage\r\n\r\n")
        assert (await read_response(reader))[0] == 400
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await eventually(lambda: api.stats().active == 0, what="server close seen")
        writer.close()


# -- lifecycle -------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_stop_closes_open_connections() -> None:
    api = StandInApi(2)
    await api.start()
    reader, writer = await send(api, "/work?ms=0")
    assert (await read_response(reader))[0] == 200
    busy = await send(api, "/work?ms=10000")
    await eventually(lambda: api.stats().in_flight == 1, what="request in flight")
    await api.stop()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert await asyncio.wait_for(busy[0].read(), 5) == b""
    writer.close()
    busy[1].close()
    stats = api.stats()
    assert stats.active == 0
    assert stats.in_flight == 0
    with pytest.raises(RuntimeError):
        _ = api.port


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_hundreds_of_simultaneous_connections() -> None:
    async with StandInApi(500, default_ms=200) as api:
        conns = await asyncio.gather(*(send(api, "/work") for _ in range(300)))
        answers = await asyncio.gather(*(read_response(c[0]) for c in conns))
        assert all(status == 200 for status, _, _ in answers)
        stats = api.stats()
        assert stats.max_concurrency == 300
        assert stats.max_in_flight == 300
        assert stats.in_flight == 0
        await asyncio.gather(*(close(c) for c in conns))
        await eventually(lambda: api.stats().active == 0, what="closes seen")
        assert api.stats().over_limit_seconds == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0},
        {"limit": 1, "default_ms": -1},
        {"limit": 1, "linger_timeout": 0},
        {"limit": 1, "idle_timeout": 0},
        {"limit": 1, "idle_timeout": float("nan")},
    ],
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


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_useful_between_counts_the_part_of_each_call_inside_the_window() -> None:
    async def scenario() -> None:
        async with StandInApi(2) as api:
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s,
                s.get(f"{api.url}/work?ms=200") as response,
            ):
                await response.read()
            st = api.stats(include_samples=False)
            whole = api.useful_between(0.0, st.elapsed_seconds)
            assert whole == pytest.approx(st.useful_seconds, abs=1e-6)
            assert 0.2 <= whole < 0.3
            (start, end) = api._acct.ok_spans[0]
            half = api.useful_between(start, start + 0.1)
            assert half == pytest.approx(0.1, abs=1e-6)
            assert api.useful_between(end, end + 5) == 0.0

    asyncio.run(scenario())
