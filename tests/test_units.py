"""Pure parts of the runtime: settings arithmetic, handler loading, probe verdicts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.exceptions import ConnectionError as RedisConnectionError

from apipool.errors import ConfigError
from apipool.exitcodes import ExitCode
from apipool.handlers import load_handler, load_handlers
from apipool.heartbeat import Heartbeat
from apipool.http_handler import parse_http_request
from apipool.layout import PoolKeys
from apipool.lease import Lease
from apipool.metrics import SlotMetrics
from apipool.probes import liveness, readiness
from apipool.protocol import PoolProtocol
from apipool.redis_checks import (
    EVICTION_RECHECK,
    MAX_TEXT,
    NOT_CHECKED,
    EvictionGuard,
    error_kind,
    eviction_problem,
    exception_text,
)
from apipool.retrying import Retrier
from apipool.settings import SlotSettings, Timings, check_pool_name
from apipool.slot import SlotWorker
from apipool.testing.clock import FakeClock

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "timings",
    [
        Timings(),
        Timings(call_timeout=2, heartbeat_interval=0.2),
        Timings(call_timeout=2, heartbeat_interval=0.2, take_block=0.5),
        Timings(call_timeout=30, heartbeat_interval=5, fence_margin=2, take_block=1),
    ],
)
def test_a_renewed_lease_leaves_room_for_a_take_and_a_whole_call(timings: Timings) -> None:
    # Just before the next renewal is due the lease has lease_ttl - heartbeat
    # left; a slot must still be allowed to take a job and call it then.
    needed = timings.call_timeout + timings.fence_margin + timings.take_block
    assert timings.lease_ttl - timings.heartbeat_interval > needed
    assert timings.shutdown_grace > timings.call_timeout


def test_timings_reject_non_positive_values() -> None:
    with pytest.raises(ConfigError, match="call_timeout must be > 0"):
        Timings(call_timeout=0)
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        Timings(heartbeat_interval=-1)


@pytest.mark.parametrize("name", ["a", "billing", "api-pool-7"])
def test_good_pool_names(name: str) -> None:
    assert check_pool_name(name) == name


@pytest.mark.parametrize("name", ["", "Billing", "-x", "x-", "a_b", "a" * 64, "a:b", "{x}"])
def test_bad_pool_names(name: str) -> None:
    with pytest.raises(ConfigError, match="pool name"):
        check_pool_name(name)


def test_keys_share_one_cluster_hash_tag() -> None:
    keys = PoolKeys("billing")
    names = [keys.queue, keys.dead, keys.stats, keys.config, keys.inflight(3), keys.lease(3)]
    names.append(keys.result("abc"))
    assert all(name.startswith("apipool:{billing}:") for name in names)
    assert len(set(names)) == len(names)


def test_an_in_flight_key_names_its_slot_only_in_canonical_decimal() -> None:
    keys = PoolKeys("billing")
    assert keys.slot_of(keys.inflight(12)) == 12
    assert keys.slot_of(keys.inflight(0).encode()) == 0
    for tail in ("03", "-1", "x", "\u00b2", "\u0663", ""):
        assert keys.slot_of(f"{keys.base}:inflight:{tail}") is None, tail
    assert keys.slot_of(PoolKeys("other").inflight(1)) is None


def test_slot_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="max_attempts"):
        SlotSettings(redis_url="redis://x", pool="p", slot=0, max_attempts=0)
    with pytest.raises(ConfigError, match="must not contain '/'"):
        SlotSettings(redis_url="redis://x", pool="p", slot=0, owner="a/b")
    with pytest.raises(ConfigError, match="slot must be >= 0"):
        SlotSettings(redis_url="redis://x", pool="p", slot=-1)


def test_handlers_load_by_spec_and_name() -> None:
    table = load_handlers(("tests.handlers:echo", "slow=tests.handlers:sleep", "http"))
    assert table[""] is table["tests.handlers:echo"]
    assert table["slow"].is_async
    assert not table["tests.handlers:echo"].is_async
    assert table["http"].is_async


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nothing", "expected 'http' or 'module:function'"),
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("tests.handlers:missing", "has no attribute 'missing'"),
        ("tests.handlers:time", "is not callable"),
        ("=tests.handlers:echo", "expected name=module:function"),
    ],
)
def test_bad_handler_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_handler(spec)


def test_duplicate_handler_names_are_rejected() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        load_handlers(("x=tests.handlers:echo", "x=tests.handlers:sleep"))


def test_http_payload_parsing() -> None:
    method, url, headers, body, timeout = parse_http_request(
        {"method": "post", "url": "http://127.0.0.1:1/x", "body": {"a": 1}, "timeout": 3}
    )
    assert (method, url, body, timeout) == ("POST", "http://127.0.0.1:1/x", b'{"a": 1}', 3.0)
    assert headers["content-type"] == "application/json"
    _, _, headers, _, _ = parse_http_request(
        {"url": "http://h/", "headers": {"content-type": "text/plain"}, "body": {"a": 1}}
    )
    assert headers.getall("Content-Type") == ["text/plain"]  # not sent twice


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("GET http://x", "must be an object"),
        ({"url": "ftp://x"}, "'url' must be an http"),
        ({"url": "http://x", "method": "BREW"}, "unsupported method"),
        ({"url": "http://x", "headers": []}, "'headers' must be an object"),
        ({"url": "http://x", "timeout": 0}, "'timeout' must be a positive"),
        ({"url": "http://x", "timeout": True}, "'timeout' must be a positive"),
    ],
)
def test_bad_http_payloads(payload: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_http_request(payload)


def test_liveness_fails_when_a_call_overruns_or_the_heartbeat_stalls() -> None:
    t = Timings(call_timeout=2, heartbeat_interval=0.5, health_grace=1)
    assert liveness(t, since_tick=0.1, call_running_for=None) == (True, "ok")
    assert liveness(t, since_tick=0.1, call_running_for=2.9) == (True, "ok")  # within grace
    ok, why = liveness(t, since_tick=0.1, call_running_for=3.5)
    assert not ok
    assert why == "call running for 3.5 s, over its timeout"
    assert liveness(t, since_tick=2.4, call_running_for=None) == (True, "ok")
    assert liveness(t, since_tick=2.6, call_running_for=None) == (False, "heartbeat loop stalled")


def test_readiness_needs_redis_a_slot_in_the_pool_and_a_valid_lease() -> None:
    assert readiness(redis_ok=False, surplus=True, lease_valid=False) == (
        False,
        "redis unreachable",
    )
    assert readiness(redis_ok=True, surplus=True, lease_valid=True) == (
        False,
        "slot index is beyond the pool's size",
    )
    assert readiness(redis_ok=True, surplus=False, lease_valid=False) == (False, "lease not held")
    assert readiness(redis_ok=True, surplus=False, lease_valid=True) == (True, "ok")


def test_a_fresh_slot_worker_is_alive_but_not_ready() -> None:
    settings = SlotSettings(
        redis_url="redis://127.0.0.1:1/0",
        pool="p",
        slot=0,
        handlers=("tests.handlers:echo",),
        timings=Timings(call_timeout=2, heartbeat_interval=0.5, health_grace=1),
    )
    worker = SlotWorker(settings)
    assert worker.health() == (True, "ok")
    assert worker.readiness() == (False, "redis unreachable")
    assert worker.exit_code == ExitCode.OK


class CancelSwallowingRedis:
    """Every script call blocks; the first cancel that lands inside it comes back
    as a RedisError, as a client library converting it would."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.swallowed = 0

    async def evalsha(self, *args: object) -> object:
        self.entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1
            raise RedisConnectionError("connection closed by a cancel") from None
        return None

    async def hget(self, *args: object) -> None:
        return None


@pytest.mark.timeout(10)
def test_heartbeat_stops_even_when_a_client_swallows_the_cancel() -> None:
    """A cancel landing inside a Redis command may come back as a RedisError,
    which the heartbeat treats as an outage; the loop must still end."""
    fake = CancelSwallowingRedis()
    lease = Lease(PoolProtocol("p"), 0, "me", 5.0)
    heartbeat = Heartbeat(lease, cast(aioredis.Redis, fake), 0.5)

    async def scenario() -> None:
        task = asyncio.create_task(heartbeat.run())
        await asyncio.wait_for(fake.entered.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 3)
        assert fake.swallowed == 1  # the cancel did come back as a RedisError
        assert not heartbeat.redis_ok

    asyncio.run(scenario())


# -- Redis errors, the eviction check, refusals ----------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (rx.ConnectionError("reset"), "transient"),
        (rx.TimeoutError("timed out"), "transient"),
        (rx.BusyLoadingError("loading"), "transient"),
        (rx.ReadOnlyError("replica"), "transient"),
        (rx.OutOfMemoryError("command not allowed"), "transient"),
        (rx.ResponseError("BUSY Redis is busy running a script"), "transient"),
        (rx.ResponseError("TRYAGAIN multiple keys"), "transient"),
        (rx.NoPermissionError("no permissions to access one of the keys"), "permanent"),
        (rx.ResponseError("WRONGTYPE Operation against a key"), "permanent"),
        (rx.ResponseError("ERR Error running script: @user_script:3"), "permanent"),
        (rx.ResponseError("CROSSSLOT Keys in request don't hash"), "permanent"),
        (rx.DataError("cannot encode"), "permanent"),
    ],
)
def test_redis_errors_are_transient_or_permanent(error: rx.RedisError, kind: str) -> None:
    assert error_kind(error) == kind


def test_eviction_is_possible_only_with_maxmemory_and_an_evicting_policy() -> None:
    assert eviction_problem(0, "allkeys-lru") is None
    assert eviction_problem(100 << 20, "noeviction") is None
    assert eviction_problem(100 << 20, "volatile-ttl") == (
        "redis may evict keys (maxmemory-policy volatile-ttl): "
        "set noeviction or pass --allow-eviction"
    )


def test_the_eviction_guard_refuses_until_checked_logs_once_and_rechecks_soon(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    guard = EvictionGuard(allow=False, every=30.0, clock=clock)
    assert guard.problem == NOT_CHECKED
    caplog.set_level(logging.INFO, logger="apipool.slot")
    evicting = eviction_problem(1, "allkeys-lru")
    guard.apply(evicting)
    guard.apply(evicting)
    assert guard.problem == evicting
    assert [r.levelno for r in caplog.records] == [logging.ERROR]  # once, not per check
    assert guard._next_at == clock() + EVICTION_RECHECK
    guard.apply(None)
    assert guard.problem is None
    assert guard._next_at == clock() + 30.0
    assert caplog.records[-1].getMessage() == "redis no longer evicts keys; serving again"


def test_the_eviction_guard_serves_when_eviction_is_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = EvictionGuard(allow=True, clock=FakeClock())
    caplog.set_level(logging.INFO, logger="apipool.slot")
    guard.apply(eviction_problem(1, "allkeys-lru"))
    guard.apply(eviction_problem(1, "allkeys-lru"))
    assert guard.problem is None
    assert [r.getMessage() for r in caplog.records] == [
        "redis may evict keys (maxmemory-policy allkeys-lru); serving anyway (--allow-eviction)"
    ]


def test_readiness_says_why_redis_refuses_or_may_evict() -> None:
    why = "redis refused taking a job: NoPermissionError: no"
    assert readiness(redis_ok=True, surplus=False, lease_valid=True, refused=why) == (False, why)
    assert readiness(redis_ok=False, surplus=False, lease_valid=True, refused=why) == (
        False,
        "redis unreachable",
    )


class Hostile(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


def test_exception_texts_are_redacted_bounded_and_never_raise() -> None:
    assert exception_text(Hostile()) == "Hostile: (message unavailable)"
    assert exception_text(KeyboardInterrupt()) == "KeyboardInterrupt"
    leaky = ValueError('GET https://h/x?key=abc failed, {"X-Token": "t0k3n"}')
    assert exception_text(leaky, ["x-token"]) == (
        'ValueError: GET https://h/x?key=[redacted] failed, {"X-Token": "[redacted]"}'
    )
    long = exception_text(ValueError("y" * 10_000))
    assert len(long) < MAX_TEXT + 40
    assert long.endswith("more characters)")


def run_retrier(
    op: Callable[[], Awaitable[str]],
    *,
    fallback: Callable[[str], Awaitable[str]] | None = None,
    stopping: bool = False,
) -> tuple[str | None, Retrier]:
    async def scenario() -> tuple[str | None, Retrier]:
        event = asyncio.Event()
        if stopping:
            event.set()
        retrier = Retrier(stopping=event, grace=5.0, metrics=SlotMetrics("p", 0))
        retrier.refused_retry = 0.05
        return await asyncio.wait_for(retrier.run("writing", op, fallback=fallback), 10), retrier

    return asyncio.run(scenario())


def errors(retrier: Retrier, kind: str) -> float:
    assert retrier.metrics is not None
    labels = {"pool": "p", "slot": "0", "kind": kind}
    return retrier.metrics.registry.get_sample_value("apipool_redis_errors_total", labels) or 0.0


def test_a_refused_step_offers_its_fallback_then_retries_slowly_until_taken() -> None:
    answers: list[str | Exception] = [
        rx.NoPermissionError("no"),
        rx.NoPermissionError("no"),
        rx.ConnectionError("reset"),
        "written",
    ]
    offered: list[str] = []

    async def op() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def fallback(why: str) -> str:
        offered.append(why)
        raise rx.NoPermissionError("not this either")

    answer, retrier = run_retrier(op, fallback=fallback)
    assert answer == "written"
    assert offered == ["redis refused writing: NoPermissionError: no"] * 2
    assert retrier.refused is None  # cleared once Redis took the step
    assert (errors(retrier, "permanent"), errors(retrier, "transient")) == (4.0, 1.0)


def test_a_refused_step_with_a_fallback_that_works_ends_there() -> None:
    async def op() -> str:
        raise rx.NoPermissionError("no")

    async def fallback(why: str) -> str:
        return f"dead: {why}"

    answer, retrier = run_retrier(op, fallback=fallback)
    assert answer == "dead: redis refused writing: NoPermissionError: no"
    assert retrier.refused is None


def test_a_refused_step_is_given_up_at_once_when_stopping() -> None:
    async def op() -> str:
        raise rx.NoPermissionError("no")

    answer, retrier = run_retrier(op, stopping=True)
    assert answer is None
    assert retrier.refused == "redis refused writing: NoPermissionError: no"
