"""The stand-in pushing back like a paid API: a shared limit, Retry-After, forced answers."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apipool.errors import ConfigError
from apipool.testing.polling import async_wait_for, wait_for
from apipool.testing.standin import StandInApi, run_in_thread

from .standin_client import (
    ask,
    assert_stats,
    close,
    http_get,
    read_response,
    read_sync,
    request,
    send,
    status_of,
)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

HTTP_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"


# -- the shared limit ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_call_arriving_at_the_shared_limit_gets_429_at_once() -> None:
    async with StandInApi(8, shared_limit=2) as api:
        working = [await send(api, "/work?ms=400") for _ in range(2)]
        await async_wait_for(lambda: api.stats().in_flight == 2, 5, what="two in flight")
        third = await send(api, "/work?ms=400")
        status, headers, body = await read_response(third[0])
        assert status == 429
        assert "retry-after" not in headers
        assert headers["connection"] == "keep-alive"
        assert body == {"error": "shared limit", "in_flight": 2, "limit": 2}
        assert api.stats().in_flight == 2  # never in flight
        for conn in working:
            assert await status_of(conn[0]) == 200
        await ask(third, "/work?ms=0")  # room again: served on the same connection
        assert await status_of(third[0]) == 200
        stats = api.stats()
        assert_stats(
            stats,
            active=3,
            max_in_flight=2,
            ok_total=3,
            rejected_total=1,
            shared_rejected_total=1,
            forced_total=0,
            shared_limit=2,
            shared_limits=[(0.0, 2)],
            over_limit_seconds=0.0,  # three connections are within the hard limit
            over_limit_events=[],
        )
        assert len(stats.rejected_at) == 1
        assert 0 < stats.rejected_at[0] < stats.elapsed_seconds
        for conn in (*working, third):
            await close(conn)


@pytest.mark.asyncio
async def test_the_hard_limit_is_checked_first_and_counted_apart() -> None:
    async with StandInApi(1, shared_limit=0) as api:
        first = await send(api, "/work?ms=0")
        status, _, body = await read_response(first[0])
        assert (status, body) == (429, {"error": "shared limit", "in_flight": 0, "limit": 0})
        second = await send(api, "/work?ms=0")
        status, _, body = await read_response(second[0])
        assert (status, body) == (429, {"error": "over limit", "active": 2, "limit": 1})
        stats = api.stats()
        assert_stats(stats, rejected_total=2, shared_rejected_total=1, max_concurrency=2)
        assert stats.over_limit_seconds > 0  # connections over the hard limit, as ever
        for conn in (first, second):
            await close(conn)


@pytest.mark.asyncio
async def test_lowering_the_shared_limit_mid_call_lets_the_calls_in_flight_finish() -> None:
    async with StandInApi(8) as api:
        working = [await send(api, "/work?ms=600") for _ in range(3)]
        await async_wait_for(lambda: api.stats().in_flight == 3, 5, what="three in flight")
        api.set_shared_limit(1)
        late = await send(api, "/work?ms=0")
        assert await status_of(late[0]) == 429
        for conn in working:  # not cut short
            status, _, body = await read_response(conn[0])
            assert (status, body["ms"]) == (200, 600.0)
        await ask(late, "/work?ms=0")
        assert await status_of(late[0]) == 200  # 0 in flight < 1
        api.set_shared_limit(None)
        more = [await send(api, "/work?ms=200") for _ in range(3)]
        assert [await status_of(c[0]) for c in more] == [200] * 3
        stats = api.stats()
        assert_stats(stats, shared_limit=None, rejected_total=1, shared_rejected_total=1)
        assert [limit for _, limit in stats.shared_limits] == [None, 1, None]
        times = [t for t, _ in stats.shared_limits]
        assert times == sorted(times)
        assert 0.0 == times[0] < times[1]
        assert times[1] <= stats.rejected_at[0] <= times[2]
        for conn in (*working, late, *more):
            await close(conn)


@pytest.mark.asyncio
async def test_the_shared_limit_holds_under_a_crowd_while_it_changes() -> None:
    """Many real clients back to back while another thread moves the limit: no
    admission ever takes the calls in flight above the limit it was judged by."""
    limits = [6, 2, 4, 1, 3]
    async with StandInApi(64, shared_limit=limits[0]) as api:
        stop = asyncio.Event()
        statuses: list[int] = []

        async def client(session: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                async with session.get(f"{api.url}/work?ms=20") as response:
                    await response.read()
                    statuses.append(response.status)

        def mover() -> None:
            for limit in limits[1:]:
                threading.Event().wait(0.3)
                api.set_shared_limit(limit)

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [asyncio.create_task(client(session)) for _ in range(12)]
            await asyncio.to_thread(mover)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)
        stats = api.stats()
        assert set(statuses) == {200, 429}
        assert stats.rejected_total == stats.shared_rejected_total == statuses.count(429)
        assert stats.ok_total == statuses.count(200)
        assert [limit for _, limit in stats.shared_limits] == limits
        # In every phase the calls in flight never rose above its limit: a rise
        # only happens by an admission, judged against the limit of that moment.
        bounds = [*(t for t, _ in stats.shared_limits[1:]), float("inf")]
        for (start, limit), end in zip(stats.shared_limits, bounds, strict=True):
            rises = [
                f
                for (t, _, f), (_, _, before) in zip(stats.samples[1:], stats.samples, strict=False)
                if start < t < end and f > before
            ]
            assert rises
            assert limit is not None
            assert max(rises) <= limit


# -- Retry-After ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_retry_after_goes_verbatim_with_429s_over_either_limit() -> None:
    async with StandInApi(1, shared_limit=1, retry_after="7") as api:
        held = await send(api, "/work?ms=500")
        await async_wait_for(lambda: api.stats().in_flight == 1, 5, what="one in flight")
        over = await send(api, "/work?ms=0")  # a second connection: over the hard limit
        status, headers, _ = await read_response(over[0])
        assert (status, headers["retry-after"]) == (429, "7")
        await close(over)
        status, headers, _ = await read_response(held[0])
        assert status == 200
        assert "retry-after" not in headers  # never on a 200
        api.set_retry_after(HTTP_DATE)
        assert api.retry_after == HTTP_DATE
        api.set_retry_after(None)
        assert api.retry_after is None
        await close(held)
        other = await send(api, "/work?ms=0")
        assert await status_of(other[0]) == 200
        api.set_shared_limit(0)
        await ask(other, "/work?ms=0")
        status, headers, body = await read_response(other[0])
        assert status == 429
        assert body["error"] == "shared limit"
        assert "retry-after" not in headers  # switched off
        api.set_retry_after(HTTP_DATE)
        await ask(other, "/work?ms=0")
        status, headers, _ = await read_response(other[0])
        assert (status, headers["retry-after"]) == (429, HTTP_DATE)
        assert api.stats().retry_after == HTTP_DATE
        await close(other)


@pytest.fixture(scope="module")
def threaded_api() -> Iterator[StandInApi]:
    with run_in_thread(1, shared_limit=0, default_ms=0) as api:
        yield api


@given(
    value=st.text(
        alphabet=st.characters(min_codepoint=32, max_codepoint=126) | st.just("\t"), max_size=40
    )
)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_printable_retry_after_is_sent_byte_for_byte(
    threaded_api: StandInApi, value: str
) -> None:
    threaded_api.set_retry_after(value)
    sock, data = http_get(threaded_api.port, "/work")
    sock.close()
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 429 ")
    assert f"\r\nRetry-After: {value}\r\n".encode() in head + b"\r\n"
    assert head.count(b"Retry-After") == 1


@pytest.mark.parametrize("value", ["1\r\nX-Evil: 1", "7\n", "caf\u00e9", "\x00"])
def test_a_retry_after_that_could_break_the_head_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="retry_after"):
        StandInApi(1, retry_after=value)
    api = StandInApi(1)
    with pytest.raises(ConfigError, match="retry_after"):
        api.set_retry_after(value)
    with pytest.raises(ConfigError, match="retry_after"):
        api.throttle_next(1, retry_after=value)
    assert api.retry_after is None


# -- forced answers ------------------------------------------------------------------


def _exchange(sock: socket.socket, target: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    sock.sendall(request(target, **kwargs))
    return read_sync(sock.makefile("rb"))


def test_throttle_next_answers_the_next_work_requests_whatever_the_limits() -> None:
    with run_in_thread(4, default_ms=0) as api:
        api.throttle_next(2, status=503, retry_after="1")
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            assert _exchange(sock, "/nope")[0] == 404  # not /work: not forced
            for _ in range(2):  # one with a body, which is skipped
                status, headers, body = _exchange(sock, "/work", method="POST", body=b"x" * 100)
                assert (status, headers["retry-after"], body) == (503, "1", {"error": "throttled"})
                assert headers["connection"] == "keep-alive"
            status, headers, _ = _exchange(sock, "/work")
            assert status == 200
            assert "retry-after" not in headers
            api.throttle_next(1)  # 429 without Retry-After
            status, headers, body = _exchange(sock, "/work")
            assert (status, body) == (429, {"error": "throttled"})
            assert "retry-after" not in headers
            api.throttle_next(5, retry_after=HTTP_DATE)
            api.throttle_next(0)  # cancels what is pending
            assert _exchange(sock, "/work")[0] == 200
        wait_for(lambda: api.stats().active == 0, 5, what="close seen")
        stats = api.stats()
        assert_stats(
            stats,
            forced_total=3,
            rejected_total=3,
            shared_rejected_total=0,
            ok_total=2,
            requests_total=6,
            max_in_flight=1,
        )
        assert len(stats.rejected_at) == 3


@pytest.mark.parametrize(("count", "status"), [(-1, 429), (1, 200), (1, 500), (1, 502)], ids=str)
def test_throttle_next_refuses_bad_arguments(count: int, status: int) -> None:
    with pytest.raises(ConfigError):
        StandInApi(1).throttle_next(count, status=status)


@pytest.mark.parametrize("limit", [-1, -8])
def test_a_negative_shared_limit_is_refused(limit: int) -> None:
    with pytest.raises(ConfigError, match="shared_limit"):
        StandInApi(1, shared_limit=limit)
    api = StandInApi(1, shared_limit=3)
    with pytest.raises(ConfigError, match="shared_limit"):
        api.set_shared_limit(limit)
    assert api.shared_limit == 3


# -- the stats -----------------------------------------------------------------------


def test_stats_over_http_and_across_a_reset() -> None:
    with run_in_thread(2, shared_limit=0, retry_after="2", default_ms=0) as api:
        sock, data = http_get(api.port, "/work")
        assert data.startswith(b"HTTP/1.1 429 ")
        sock.close()
        api.throttle_next(1)
        _, data = http_get(api.port, "/stats")
        doc = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert {k: doc[k] for k in ("shared_limit", "shared_limits", "retry_after")} == {
            "shared_limit": 0,
            "shared_limits": [[0.0, 0]],
            "retry_after": "2",
        }
        assert (doc["rejected_total"], doc["shared_rejected_total"]) == (1, 1)
        assert len(doc["rejected_at"]) == 1
        _, data = http_get(api.port, "/stats?samples=0")
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["rejected_at"] == []
        api.set_shared_limit(None)
        api.reset()  # settings stay, pending forced answers too; counters restart
        stats = api.stats()
        assert_stats(
            stats,
            shared_limit=None,
            shared_limits=[(0.0, None)],
            retry_after="2",
            rejected_total=0,
            shared_rejected_total=0,
            forced_total=0,
            rejected_at=[],
        )
        sock, data = http_get(api.port, "/work")
        sock.close()
        assert data.startswith(b"HTTP/1.1 429 ")  # the forced answer still pending
        assert b"\r\nRetry-After" not in data  # its own: none
        assert api.stats().forced_total == 1


def test_stats_with_the_new_fields_round_trip_through_json() -> None:
    with run_in_thread(1, shared_limit=1) as api:
        api.set_shared_limit(3)
        doc = api.stats().to_dict()
        assert json.loads(json.dumps(doc)) == doc
        assert [limit for _, limit in doc["shared_limits"]] == [1, 3]
