"""The stand-in's routes: ``/stats``, 404, and malformed requests (400, then closed)."""

from __future__ import annotations

import asyncio

import pytest

from apipool.testing.polling import async_wait_for
from apipool.testing.standin import StandInApi

from .standin_client import (
    ask,
    assert_stats,
    close,
    closed_by_server,
    read_response,
    send,
    status_of,
)

pytestmark = [pytest.mark.unit, pytest.mark.asyncio, pytest.mark.timeout(30)]


EXPECTED_STATS = {
    "active": 1,
    "in_flight": 0,
    "limit": 1,
    "requests_total": 1,
    "connections_total": 1,
    "rejected_total": 0,
    "over_limit_seconds": 0,
}
"""``/stats`` while one kept-alive connection has been answered once."""


async def test_stats_endpoint_is_not_counted_nor_limited() -> None:
    async with StandInApi(1) as api:
        held = await send(api, "/work?ms=0")
        assert await status_of(held[0]) == 200
        for query in ("", "?samples=0"):
            reader, writer = await send(api, "/stats" + query)
            status, headers, body = await read_response(reader)
            assert headers["connection"] == "close"
            assert await closed_by_server(reader)
            writer.close()
            assert status == 200
            assert {k: body[k] for k in EXPECTED_STATS} == EXPECTED_STATS
            if query:
                assert body["samples"] == []
            else:
                assert body["samples"]
                assert all(len(s) == 3 for s in body["samples"])
        assert api.stats().max_concurrency == 1
        await close(held)


async def test_stats_on_a_counted_connection_closes_and_uncounts_it() -> None:
    async with StandInApi(2) as api:
        conn = await send(api, "/work?ms=0")
        assert await status_of(conn[0]) == 200
        await ask(conn, "/stats?samples=0")
        status, headers, body = await read_response(conn[0])
        assert status == 200
        assert headers["connection"] == "close"
        assert body["active"] == 1
        assert await closed_by_server(conn[0])
        await async_wait_for(lambda: api.stats().active == 0, 5, what="server close seen")
        assert api.stats().requests_total == 1
        conn[1].close()


async def test_unknown_path_is_404_and_keeps_the_connection() -> None:
    async with StandInApi(2) as api:
        conn = await send(api, "/nope")
        status, headers, body = await read_response(conn[0])
        assert status == 404
        assert headers["connection"] == "keep-alive"
        assert body["error"] == "not found"
        await ask(conn, "/work", method="DELETE")
        assert await status_of(conn[0]) == 404
        assert api.stats().ok_total == 0
        await ask(conn, "/work?ms=0")
        assert await status_of(conn[0]) == 200
        assert_stats(api.stats(), ok_total=1, requests_total=3, connections_total=1)
        await close(conn)


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
        assert await closed_by_server(reader)
        writer.close()
        assert_stats(api.stats(), active=0, requests_total=0)


async def test_malformed_head_on_a_counted_connection_closes_and_uncounts_it() -> None:
    async with StandInApi(1) as api:
        reader, writer = await send(api, "/work?ms=0")
        assert await status_of(reader) == 200
        writer.write(b"garbage\r\n\r\n")
        assert await status_of(reader) == 400
        assert await closed_by_server(reader)
        await async_wait_for(lambda: api.stats().active == 0, 5, what="server close seen")
        writer.close()
