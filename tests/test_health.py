"""The probe server on its own, the call tracker, and the verdicts it serves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from apipool.health import HealthServer
from apipool.metrics import FAILURE_CAUSES, SlotMetrics
from apipool.probes import CallTracker
from apipool.protocol import Outcome
from apipool.testing.clock import FakeClock

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class Switch:
    """A check whose answer the test sets; counts how often it was asked."""

    def __init__(self, ok: bool, reason: str = "ok") -> None:
        self.answer = (ok, reason)
        self.asked = 0

    def __call__(self) -> tuple[bool, str]:
        self.asked += 1
        return self.answer


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, server: HealthServer, path: str) -> tuple[int, Any]:
    async with http.get(f"http://127.0.0.1:{server.port}{path}") as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


def make_server(
    health: Callable[[], tuple[bool, str]],
    readiness: Callable[[], tuple[bool, str]],
    registry: CollectorRegistry | None = None,
) -> HealthServer:
    return HealthServer(
        health=health,
        readiness=readiness,
        registry=registry or CollectorRegistry(),
        info={"pool": "billing", "slot": 3},
    )


@pytest.mark.asyncio
async def test_probes_answer_200_with_the_reason_and_the_info(
    http: aiohttp.ClientSession,
) -> None:
    server = make_server(Switch(True), Switch(True))
    await server.start()
    try:
        for path in ("/healthz", "/readyz"):
            status, body = await get(http, server, path)
            assert status == 200
            assert body == {"ok": True, "reason": "ok", "pool": "billing", "slot": 3}
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_a_failing_check_answers_503_with_its_reason(http: aiohttp.ClientSession) -> None:
    health, ready = Switch(True), Switch(False, "lease not held")
    server = make_server(health, ready)
    await server.start()
    try:
        assert (await get(http, server, "/healthz"))[0] == 200
        status, body = await get(http, server, "/readyz")
        assert status == 503
        assert body["ok"] is False
        assert body["reason"] == "lease not held"
        health.answer = (False, "heartbeat loop stalled")
        status, body = await get(http, server, "/healthz")
        assert (status, body["reason"]) == (503, "heartbeat loop stalled")
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_checks_are_asked_at_every_request_and_only_their_own(
    http: aiohttp.ClientSession,
) -> None:
    health, ready = Switch(True), Switch(True)
    server = make_server(health, ready)
    await server.start()
    try:
        for _ in range(3):
            await get(http, server, "/healthz")
        await get(http, server, "/readyz")
        assert (health.asked, ready.asked) == (3, 1)
        ready.answer = (False, "redis unreachable")
        assert (await get(http, server, "/readyz"))[0] == 503
        ready.answer = (True, "ok")
        assert (await get(http, server, "/readyz"))[0] == 200
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_metrics_serve_the_registry_in_the_prometheus_format(
    http: aiohttp.ClientSession,
) -> None:
    metrics = SlotMetrics("billing", 3)
    metrics.outcome(Outcome.RETRIED, cause="timeout")
    server = make_server(Switch(True), Switch(True), metrics.registry)
    await server.start()
    try:
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
            text = await response.text()
    finally:
        await server.stop()
    labels = 'pool="billing",slot="3"'
    assert f'apipool_calls_total{{outcome="retried",{labels}}} 1.0' in text
    assert f'apipool_failures_total{{cause="timeout",{labels}}} 1.0' in text
    for outcome in Outcome:
        assert f'apipool_calls_total{{outcome="{outcome.value}",{labels}}}' in text


@pytest.mark.asyncio
async def test_only_the_given_registry_is_served(http: aiohttp.ClientSession) -> None:
    registry = CollectorRegistry()
    Counter("only_mine", "a counter of this registry", registry=registry).inc(2)
    server = make_server(Switch(True), Switch(True), registry)
    await server.start()
    try:
        _, text = await get(http, server, "/metrics")
    finally:
        await server.stop()
    assert "only_mine_total 2.0" in text
    assert "apipool_calls_total" not in text
    assert "process_cpu_seconds_total" not in text  # not the global default registry


@pytest.mark.asyncio
async def test_port_zero_picks_a_free_port_and_stop_closes_it(
    http: aiohttp.ClientSession,
) -> None:
    server = make_server(Switch(True), Switch(True))
    assert server.port is None
    port = await server.start()
    assert port == server.port
    assert port
    with pytest.raises(RuntimeError, match="already started"):
        await server.start()
    await server.stop()
    await server.stop()  # twice is harmless
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(http, server, "/healthz")


@pytest.mark.asyncio
async def test_unknown_paths_are_404(http: aiohttp.ClientSession) -> None:
    server = make_server(Switch(True), Switch(True))
    await server.start()
    try:
        assert (await get(http, server, "/"))[0] == 404
        assert (await get(http, server, "/health"))[0] == 404
    finally:
        await server.stop()


# -- the call tracker (what /healthz knows of the call in progress) -----------------------


def test_call_tracker_measures_the_call_in_progress() -> None:
    clock = FakeClock()
    calls = CallTracker(clock)
    assert not calls.running
    assert calls.running_for() is None
    started = calls.start()
    assert started == clock.now
    assert calls.running
    clock.advance(2.5)
    assert calls.running_for() == pytest.approx(2.5)
    clock.advance(0.5)
    assert calls.finish() == pytest.approx(3.0)
    assert not calls.running
    assert calls.running_for() is None


def test_call_tracker_holds_one_call_at_a_time() -> None:
    calls = CallTracker(FakeClock())
    with pytest.raises(RuntimeError, match="no call is running"):
        calls.finish()
    calls.start()
    with pytest.raises(RuntimeError, match="already running"):
        calls.start()
    calls.finish()
    calls.start()  # the next call may start once the last one is over


def test_slot_metrics_start_with_every_outcome_and_cause_at_zero() -> None:
    metrics = SlotMetrics("p", 0)
    labels = {"pool": "p", "slot": "0"}
    get_value = metrics.registry.get_sample_value
    for outcome in Outcome:
        assert get_value("apipool_calls_total", {**labels, "outcome": outcome.value}) == 0.0
    for cause in FAILURE_CAUSES:
        assert get_value("apipool_failures_total", {**labels, "cause": cause}) == 0.0
    metrics.outcome(Outcome.DEAD, cause="unknown handler")
    metrics.outcome(Outcome.OK)
    assert get_value("apipool_calls_total", {**labels, "outcome": "dead"}) == 1.0
    assert get_value("apipool_calls_total", {**labels, "outcome": "ok"}) == 1.0
    assert get_value("apipool_failures_total", {**labels, "cause": "unknown handler"}) == 1.0
    assert get_value("apipool_failures_total", {**labels, "cause": "error"}) == 0.0
