"""The stand-in counts open connections against its limit, and answers 429 above it."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from apipool.testing.polling import async_wait_for
from apipool.testing.standin import StandInApi

from .standin_client import ask, assert_stats, close, read_response, send, status_of, stays

pytestmark = [pytest.mark.unit, pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_third_client_over_limit_two_gets_429() -> None:
    async with StandInApi(2) as api:
        first = await send(api, "/work?ms=300")
        second = await send(api, "/work?ms=300")
        await async_wait_for(lambda: api.stats().active == 2, 5, what="two active")
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
        assert_stats(
            stats,
            max_concurrency=3,
            max_in_flight=2,
            rejected_total=1,
            ok_total=2,
            requests_total=3,
            connections_total=3,
        )
        assert stats.over_limit_seconds > 0
        assert len(stats.over_limit_events) == 1
        assert stats.over_limit_events[0]["peak"] == 3
        assert stats.over_limit_events[0]["end"] is None  # the rejected client is still open
        await close(third)
        await async_wait_for(lambda: api.stats().active == 2, 5, what="rejected client gone")
        event = api.stats().over_limit_events[0]
        assert event["end"] is not None
        assert event["end"] > event["start"]
        for conn in (first, second):
            await close(conn)
        await async_wait_for(lambda: api.stats().active == 0, 5, what="all gone")


async def test_idle_kept_alive_connection_still_counts_against_the_limit() -> None:
    async with StandInApi(1) as api:
        idle = await send(api, "/work?ms=0")
        status, headers, body = await read_response(idle[0])
        assert status == 200
        assert headers["connection"] == "keep-alive"
        assert body["active"] == 1
        # Answered, still open: counted as a connection, but nothing in flight.
        assert await stays(lambda: api.stats().active == 1, 0.3)
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
        assert_stats(
            stats,
            active=2,
            max_concurrency=2,
            in_flight=0,
            max_in_flight=1,
            connections_total=2,
            requests_total=3,
            rejected_total=2,
        )
        assert stats.over_limit_seconds > 0
        await close(other)
        await async_wait_for(lambda: api.stats().active == 1, 5, what="rejected client gone")
        assert api.stats().over_limit_events[0]["end"] is not None
        await ask(idle, "/work?ms=0")
        status, _, body = await read_response(idle[0])
        assert status == 200
        assert body["active"] == 1
        await close(idle)
        await async_wait_for(lambda: api.stats().active == 0, 5, what="close seen")


async def test_client_leaving_mid_call_is_uncounted_at_once() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=10000")
        await async_wait_for(lambda: api.stats().in_flight == 1, 5, what="request in flight")
        assert api.stats().active == 1
        started = time.monotonic()
        await close(conn)
        await async_wait_for(lambda: api.stats().active == 0, 5, what="close seen")
        assert time.monotonic() - started < 5
        assert_stats(api.stats(), in_flight=0, ok_total=0, useful_seconds=0, nominal_seconds=0)


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
        await async_wait_for(lambda: api.stats().active == 0, 5, what="last close seen")
        stats = api.stats()
        assert_stats(
            stats,
            ok_total=200,
            requests_total=200,
            connections_total=200,
            rejected_total=0,
            max_concurrency=1,
            over_limit_seconds=0,
            over_limit_events=[],
            nominal_seconds=pytest.approx(0.1),
        )
        assert stats.useful_seconds >= stats.nominal_seconds - 1e-6


async def test_reconnect_right_after_close_is_not_over_limit() -> None:
    """A client that closes and reconnects at once must never look like two."""
    async with StandInApi(1) as api:
        for _ in range(300):
            conn = await send(api, "/work?ms=0")
            assert await status_of(conn[0]) == 200
            conn[1].close()  # no wait_closed: the next connect follows immediately
        await async_wait_for(lambda: api.stats().active == 0, 5, what="last close seen")
        assert_stats(api.stats(), rejected_total=0, over_limit_seconds=0)


@pytest.mark.timeout(60)
async def test_hundreds_of_simultaneous_connections() -> None:
    async with StandInApi(500, default_ms=200) as api:
        conns = await asyncio.gather(*(send(api, "/work") for _ in range(300)))
        answers = await asyncio.gather(*(read_response(c[0]) for c in conns))
        assert all(status == 200 for status, _, _ in answers)
        assert_stats(api.stats(), max_concurrency=300, max_in_flight=300, in_flight=0)
        await asyncio.gather(*(close(c) for c in conns))
        await async_wait_for(lambda: api.stats().active == 0, 5, what="closes seen")
        assert api.stats().over_limit_seconds == 0
