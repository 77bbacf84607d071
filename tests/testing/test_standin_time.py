"""The stand-in's time accounting: in flight, busy, over-limit and useful seconds."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from apipool.testing.polling import async_wait_for
from apipool.testing.standin import StandInApi

from .standin_client import ask, assert_stats, close, read_response, send, status_of, stays

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


@pytest.mark.asyncio
async def test_in_flight_counts_requests_being_served() -> None:
    async with StandInApi(3) as api:
        idle = await send(api, "/work?ms=0")
        assert await status_of(idle[0]) == 200
        working = [await send(api, "/work?ms=400") for _ in range(2)]
        await async_wait_for(lambda: api.stats().in_flight == 2, 5, what="two in flight")
        assert api.stats().active == 3
        for conn in working:
            assert await status_of(conn[0]) == 200
        stats = api.stats()
        assert_stats(stats, in_flight=0, active=3, max_in_flight=2, max_concurrency=3)
        assert stats.samples[0] == (0.0, 0, 0)
        assert max(f for _, _, f in stats.samples) == 2
        assert all(f <= a for _, a, f in stats.samples)
        for conn in (idle, *working):
            await close(conn)
        await async_wait_for(lambda: api.stats().active == 0, 5, what="closes seen")


@pytest.mark.asyncio
async def test_busy_seconds_follows_in_flight_not_idle_connections() -> None:
    async with StandInApi(4) as api:
        conns = [await send(api, "/work?ms=0") for _ in range(2)]
        for conn in conns:
            assert await status_of(conn[0]) == 200
        api.reset()  # both stay counted across the reset
        assert await stays(lambda: api.stats().active == 2, 0.3)
        assert_stats(
            api.stats(include_samples=False),
            requests_total=0,
            max_concurrency=2,
            in_flight=0,
            busy_seconds=0.0,  # open but idle: no work
            utilisation=0.0,
            samples=[],
        )
        for conn in conns:
            await ask(conn, "/work?ms=10000")
        await async_wait_for(lambda: api.stats().in_flight == 2, 5, what="two in flight")
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
        await async_wait_for(lambda: api.stats().active == 0, 5, what="closes seen")
        stats = api.stats()
        assert_stats(stats, in_flight=0, ok_total=0, useful_seconds=0)
        frozen = stats.busy_seconds
        await asyncio.sleep(0.1)
        assert api.stats().busy_seconds == frozen


@pytest.mark.asyncio
async def test_idle_connections_over_the_limit_are_over_limit_but_not_busy() -> None:
    async with StandInApi(1) as api:
        ok = await send(api, "/work?ms=0")
        assert await status_of(ok[0]) == 200
        rejected = await send(api, "/work?ms=0")
        assert await status_of(rejected[0]) == 429
        api.reset()
        assert await stays(lambda: api.stats().active == 2, 0.3)
        stats = api.stats()
        assert_stats(
            stats,
            in_flight=0,
            busy_seconds=0.0,
            over_limit_seconds=pytest.approx(stats.elapsed_seconds, rel=1e-6),
            over_limit_events=[{"start": 0.0, "end": None, "peak": 2}],
        )
        await close(rejected)
        await close(ok)
        await async_wait_for(lambda: api.stats().active == 0, 5, what="closes seen")
        samples = api.stats().samples
        assert samples[0] == (0.0, 2, 0)
        assert [s[1:] for s in samples[-2:]] == [(1, 0), (0, 0)]


@pytest.mark.asyncio
async def test_useful_seconds_is_the_service_time_of_200s() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=20")
        assert await status_of(conn[0]) == 200
        for target in ["/work?ms=20"] * 9 + ["/nope", "/work?ms=x"]:
            await ask(conn, target)
            await read_response(conn[0])
        other = await send(api, "/work?ms=500")
        assert await status_of(other[0]) == 429
        stats = api.stats()
        assert_stats(stats, ok_total=10, nominal_seconds=pytest.approx(0.2))
        assert stats.nominal_seconds - 1e-6 <= stats.useful_seconds < stats.nominal_seconds + 0.15
        assert stats.useful_seconds <= stats.busy_seconds + 1e-6
        await close(other)
        await close(conn)


@pytest.mark.asyncio
async def test_useful_seconds_includes_the_servers_own_lateness() -> None:
    async with StandInApi(1) as api:
        conn = await send(api, "/work?ms=50")
        await async_wait_for(lambda: api.stats().in_flight == 1, 5, what="request in flight")
        # Block the server's event loop on purpose: its timer fires late.
        time.sleep(0.3)  # noqa: ASYNC251
        status, _, body = await read_response(conn[0])
        assert status == 200
        assert body["ms"] == 50.0
        stats = api.stats()
        assert stats.nominal_seconds == pytest.approx(0.05)
        assert stats.useful_seconds >= 0.3
        await close(conn)


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
