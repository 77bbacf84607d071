"""HTTP/1.1 persistent connections at the stand-in: reuse, pipelining, close, timeouts."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest

from apipool.testing.polling import async_wait_for, wait_for
from apipool.testing.standin import StandInApi, run_in_thread

from .standin_client import (
    ask,
    assert_stats,
    close,
    closed_by_server,
    no_answer,
    read_response,
    read_sync,
    request,
    send,
    status_of,
    stays,
)

pytestmark = pytest.mark.unit


@pytest.mark.timeout(30)
def test_keep_alive_serves_many_requests_on_one_raw_socket() -> None:
    with run_in_thread(1, default_ms=0) as api:
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            rfile = sock.makefile("rb")
            for i in range(5):
                sock.sendall(request(f"/work?ms={i}"))
                status, headers, body = read_sync(rfile)
                assert status == 200
                assert body == {"ok": True, "ms": float(i), "active": 1}
                assert headers["connection"] == "keep-alive"
                assert headers["keep-alive"] == "timeout=60"
            assert_stats(
                api.stats(),
                active=1,
                in_flight=0,
                connections_total=1,
                requests_total=5,
                ok_total=5,
                max_concurrency=1,
                max_in_flight=1,
                nominal_seconds=pytest.approx(0.010),
            )
            rfile.close()
        wait_for(lambda: api.stats().active == 0, 5, what="close seen")
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
        await async_wait_for(lambda: api.stats().active == 0, 5, what="session closed")
        stats = api.stats()
        assert_stats(
            stats,
            connections_total=1,
            requests_total=20,
            ok_total=20,
            rejected_total=0,
            max_concurrency=1,
            max_in_flight=1,
            over_limit_seconds=0,
            over_limit_events=[],
            nominal_seconds=pytest.approx(0.040),
        )
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
        assert_stats(
            api.stats(),
            connections_total=1,
            requests_total=5,
            ok_total=4,
            max_in_flight=1,  # served one after the other
            in_flight=0,
            active=1,
        )
        await close((reader, writer))
        await async_wait_for(lambda: api.stats().active == 0, 5, what="close seen")


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_thousands_of_pipelined_requests_in_one_send() -> None:
    async with StandInApi(1) as api:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(request("/nope") * 3000 + request("/work?ms=0"))
        await writer.drain()
        for _ in range(3000):
            assert await status_of(reader) == 404
        assert await status_of(reader) == 200
        assert_stats(api.stats(), requests_total=3001, connections_total=1, ok_total=1)
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
            assert await status_of(conn[0]) == 200
        else:
            assert await no_answer(conn[0])  # discarded, and not closed either
        assert api.stats().requests_total == (2 if keep_alive else 1)
        await close(conn)
        await async_wait_for(lambda: api.stats().active == 0, 5, what="close seen")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_connection_close_request_stays_counted_until_the_client_closes() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=0", headers=("Connection: close",))
        status, headers, body = await read_response(conn[0])
        assert status == 200
        assert headers["connection"] == "close"
        assert body["active"] == 1
        assert await stays(lambda: api.stats().active == 1, 0.3)
        assert api.stats().in_flight == 0
        await close(conn)
        await async_wait_for(lambda: api.stats().active == 0, 5, what="close seen")
        stats = api.stats()
        assert stats.over_limit_seconds == 0
        assert stats.samples[-1][1:] == (0, 0)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_linger_timeout_closes_a_connection_that_asked_to_close() -> None:
    async with StandInApi(1, linger_timeout=0.2) as api:
        reader, writer = await send(api, "/work?ms=0", headers=("Connection: close",))
        assert await status_of(reader) == 200
        await async_wait_for(lambda: api.stats().active == 0, 5, what="linger timeout")
        assert await closed_by_server(reader)
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
        await async_wait_for(lambda: api.stats().active == 0, 5, what="idle timeout")
        assert time.monotonic() - began >= 0.15
        assert await closed_by_server(reader)
        writer.close()
        # A connection that never sends a request is closed too, never counted.
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        assert await closed_by_server(reader)
        writer.close()
        assert api.stats().connections_total == 1


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_idle_timeout_spares_a_long_request_and_restarts_after_each() -> None:
    async with StandInApi(1, idle_timeout=0.3) as api:
        conn = await send(api, "/work?ms=600")
        assert await status_of(conn[0]) == 200
        for _ in range(4):
            await asyncio.sleep(0.15)
            await ask(conn, "/work?ms=0")
            assert await status_of(conn[0]) == 200
        # A slow body: the request began with its head, so the connection is not idle.
        conn[1].write(request("/work?ms=0", method="POST", body=b"abcdef")[:-3])
        await asyncio.sleep(0.5)
        conn[1].write(b"def")
        assert await status_of(conn[0]) == 200
        assert_stats(api.stats(), connections_total=1, ok_total=6, active=1)
        await close(conn)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_rejected_request_body_is_skipped_on_a_kept_alive_connection() -> None:
    async with StandInApi(1) as api:
        first = await send(api, "/work?ms=0")
        assert await status_of(first[0]) == 200
        body = b"GET /nope HTTP/1.1\r\n\r\n" * 300
        second = await send(api, "/work?ms=0", method="POST", body=body)
        assert await status_of(second[0]) == 429
        await close(first)
        await async_wait_for(lambda: api.stats().active == 1, 5, what="first gone")
        await ask(second, "/work?ms=0")
        status, _, answer = await read_response(second[0])
        assert status == 200
        assert answer["active"] == 1
        assert await no_answer(second[0], 0.1)  # nothing from the skipped body
        assert api.stats().requests_total == 3
        await close(second)


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
        await async_wait_for(lambda: api.stats().active == 0, 5, what="closes seen")
        stats = api.stats()
        assert stats.nominal_seconds == pytest.approx(0.02)
        assert stats.useful_seconds >= stats.nominal_seconds - 1e-6
