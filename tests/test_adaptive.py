"""A shared limit, with real slot processes and the stand-in API: while the API
answers 429 above a limit lower than N (other consumers use the rest), the pool
uses fewer slots (the ones above the effective concurrency are parked, keeping
their leases), no job is lost or loses an attempt to a 429, and the pool climbs
back to N once the API stops refusing. With adaptation switched off, nothing
is parked."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis

from apipool.client import Client
from apipool.layout import PoolKeys
from apipool.stats import write_pool_config
from apipool.testing.polling import wait_for
from apipool.testing.standin import StandInApi
from apipool.testing.standin.server import StandInThread

from .conftest import SlotProcess
from .frameworks import Load

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

StartSlot = Callable[..., SlotProcess]
N = 4


@pytest.fixture
def api() -> Iterator[StandInApi]:
    thread = StandInThread(N, default_ms=50)
    yield thread.start()
    thread.stop()


def effective(r: redis.Redis, pool: str) -> int:
    value = r.get(PoolKeys(pool).effective)
    return N if value is None else int(value)


def parked(slots: list[SlotProcess]) -> int:
    """Slots whose /metrics say they are parked."""
    return sum(
        any(
            line.startswith("apipool_slot_parked{") and line.endswith(" 1.0")
            for line in slot.text("/metrics").splitlines()
        )
        for slot in slots
    )


def start_pool(
    start_slot: StartSlot, api: StandInApi, extra: tuple[str, ...] = ()
) -> list[SlotProcess]:
    slots = [
        start_slot(i, handler="http", extra=("--allow-url", f"{api.url}/", *extra))
        for i in range(N)
    ]
    for slot in slots:
        wait_for(lambda slot=slot: slot.status("/readyz") == 200, 15, what="slot ready")
    return slots


def test_the_pool_adapts_below_n_and_climbs_back(
    start_slot: StartSlot, api: StandInApi, redis_url: str, pool: str, r: redis.Redis
) -> None:
    write_pool_config(r, pool, slots=N)
    slots = start_pool(start_slot, api)
    load = Load(redis_url, pool, f"{api.url}/work?ms=50", depth=2 * N, every=0.005)
    with load:
        wait_for(lambda: api.stats(include_samples=False).ok_total > 40, 20, what="calls")
        api.set_shared_limit(2)  # others take half of the API's limit
        wait_for(lambda: effective(r, pool) <= 2, 15, what="the pool adapting down")
        time.sleep(3.0)
        before = api.stats(include_samples=False)
        time.sleep(4.0)
        after = api.stats(include_samples=False)
        refused = after.shared_rejected_total - before.shared_rejected_total
        served = after.ok_total - before.ok_total
        assert served > 50
        # Settled: a probe now and then (one 429 each), not a storm.
        assert refused <= 0.1 * (served + refused), (refused, served)
        assert effective(r, pool) <= 3
        assert parked(slots) >= 1
        # A parked slot holds no connection to the API: at most one per slot in use.
        wait_for(
            lambda: api.stats(include_samples=False).active <= effective(r, pool) + 1,
            5,
            what="parked slots' connections closed",
        )
        api.set_shared_limit(None)  # the others are gone
        wait_for(lambda: effective(r, pool) == N, 15, what="the pool back to N")
        wait_for(lambda: parked(slots) == 0, 5, what="no slot parked")
    with Client(redis_url, pool) as client:
        for job_id in load.ids:
            result = client.wait(job_id, 30)
            assert result.status == "ok", result
            assert result.attempt == 1  # a 429 costs no attempt
    stats = api.stats(include_samples=False)
    assert stats.max_concurrency <= N
    assert stats.over_limit_seconds == 0


def test_without_adaptation_no_slot_is_parked(
    start_slot: StartSlot, api: StandInApi, redis_url: str, pool: str, r: redis.Redis
) -> None:
    write_pool_config(r, pool, slots=N)
    slots = start_pool(start_slot, api, ("--adaptive", "false"))
    load = Load(redis_url, pool, f"{api.url}/work?ms=50", depth=2 * N, every=0.005)
    with load:
        wait_for(lambda: api.stats(include_samples=False).ok_total > 20, 20, what="calls")
        api.set_shared_limit(2)
        wait_for(lambda: int(r.hget(PoolKeys(pool).stats, "throttled") or 0) >= 5, 15,
                 what="429s")  # fmt: skip
        assert r.get(PoolKeys(pool).effective) is None
        assert parked(slots) == 0
        api.set_shared_limit(None)
    with Client(redis_url, pool) as client:
        for job_id in load.ids:
            assert client.wait(job_id, 30).status == "ok"
