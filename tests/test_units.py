"""Pure parts of the runtime: settings arithmetic, handler loading, probe verdicts."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from apipool.errors import ConfigError
from apipool.exitcodes import ExitCode
from apipool.handlers import load_handler, load_handlers
from apipool.heartbeat import Heartbeat
from apipool.http_handler import parse_http_request
from apipool.layout import PoolKeys
from apipool.lease import Lease
from apipool.probes import liveness, readiness
from apipool.protocol import PoolProtocol
from apipool.settings import SlotSettings, Timings, check_pool_name
from apipool.slot import SlotWorker

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
