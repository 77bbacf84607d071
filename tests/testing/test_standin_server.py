"""The stand-in server's life: arguments, start and stop, in a thread from sync code."""

from __future__ import annotations

from typing import Any

import pytest

from apipool.errors import ConfigError
from apipool.testing.polling import async_wait_for, wait_for
from apipool.testing.standin import StandInApi, StandInThread, run_in_thread

from .standin_client import assert_stats, closed_by_server, http_get, send, status_of

pytestmark = pytest.mark.unit


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_stop_closes_open_connections() -> None:
    api = StandInApi(2)
    await api.start()
    reader, writer = await send(api, "/work?ms=0")
    assert await status_of(reader) == 200
    busy = await send(api, "/work?ms=10000")
    await async_wait_for(lambda: api.stats().in_flight == 1, 5, what="request in flight")
    await api.stop()
    assert await closed_by_server(reader)
    assert await closed_by_server(busy[0])
    writer.close()
    busy[1].close()
    assert_stats(api.stats(), active=0, in_flight=0)
    with pytest.raises(RuntimeError):
        _ = api.port


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


@pytest.mark.timeout(30)
def test_run_in_thread_from_sync_code() -> None:
    with run_in_thread(1, default_ms=0) as api:
        assert api.url == f"http://127.0.0.1:{api.port}"
        sock, data = http_get(api.port, "/work")
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert api.stats().active == 1  # read from this thread while the loop runs
        sock.close()
        wait_for(lambda: api.stats().active == 0, 5, what="close seen")
        api.reset()
        assert api.stats().requests_total == 0
        sock, _ = http_get(api.port, "/work")
    # The server closed the connection it still had open when it stopped.
    assert sock.recv(10) == b""
    sock.close()


@pytest.mark.timeout(30)
def test_stand_in_thread_reports_a_busy_port() -> None:
    with run_in_thread(1) as api:
        clash = StandInThread(1, port=api.port)
        with pytest.raises(OSError, match="address already in use"):
            clash.start()
