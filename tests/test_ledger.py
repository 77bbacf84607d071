"""The ledger against a real redis-server: the LEDGER step, the reader, the heartbeat's writes."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from apipool.heartbeat import Heartbeat
from apipool.layout import LEDGER_TTL_SECONDS, PoolKeys
from apipool.lease import Lease
from apipool.ledger import read_ledger, summarize
from apipool.metrics import SlotMetrics
from apipool.protocol import PoolProtocol
from apipool.slot_time import STATES, SlotTime
from apipool.stats import write_pool_config
from apipool.testing.clock import FakeClock
from apipool.testing.redis_server import free_port

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

MINUTE = 29_000_000  # a minute number (unix time // 60) in 2025


def floats(raw: dict[bytes, bytes]) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in raw.items()}


def test_the_step_adds_seconds_copies_n_and_sets_the_expiry(r: redis.Redis, pool: str) -> None:
    proto, keys = PoolProtocol(pool), PoolKeys(pool)
    write_pool_config(r, pool, slots=3)
    step = proto.ledger({MINUTE: {"calling": 1.5, "handoff": 0.25}, MINUTE + 1: {"calling": 2.0}})
    assert step.run(r) == 2
    assert proto.ledger({MINUTE: {"calling": 0.5}}).run(r) == 1
    assert floats(r.hgetall(keys.ledger(MINUTE))) == {"calling": 2.0, "handoff": 0.25, "slots": 3}
    assert floats(r.hgetall(keys.ledger(MINUTE + 1))) == {"calling": 2.0, "slots": 3}
    assert LEDGER_TTL_SECONDS - 5 < r.ttl(keys.ledger(MINUTE)) <= LEDGER_TTL_SECONDS
    assert keys.ledger(MINUTE) == f"apipool:{{{pool}}}:ledger:{MINUTE}"


def test_the_reader_sums_capacity_states_and_down(r: redis.Redis, pool: str) -> None:
    proto = PoolProtocol(pool)
    write_pool_config(r, pool, slots=2)
    proto.ledger({MINUTE: {"calling": 60.0, "waiting_for_work": 30.0}}).run(r)
    proto.ledger({MINUTE + 1: {"calling": 10.0, "fenced": 5.0}}).run(r)
    now = (MINUTE + 1) * 60 + 15.0  # 15 s into the second minute
    seen = read_ledger(r, pool, seconds=600, now=now)
    assert seen.since == MINUTE * 60  # minutes before the first write are not counted
    assert seen.capacity == pytest.approx(2 * 60 + 2 * 15)
    assert seen.states["calling"] == 70
    assert seen.down == pytest.approx(150 - 70 - 30 - 5)
    assert seen.accounted + seen.down == pytest.approx(seen.capacity)
    assert seen.utilization == pytest.approx(70 / 150)
    assert seen.largest_loss == ("down", pytest.approx(45 / 150))
    assert seen.to_dict()["largest_loss"]["cause"] == "down"


def test_down_is_never_negative_and_nothing_recorded_is_no_capacity() -> None:
    over = summarize(
        "p",
        {MINUTE: {b"calling": b"200", b"slots": b"2"}},
        since=MINUTE * 60,
        until=MINUTE * 60 + 60,
        slots_now=2,
    )
    assert over.capacity == 120
    assert over.down == 0
    assert over.largest_loss is None
    empty = summarize("p", {}, since=MINUTE * 60, until=MINUTE * 60 + 60, slots_now=4)
    assert empty.capacity == 0
    assert empty.utilization is None


def test_a_minute_no_slot_wrote_counts_as_down_with_n_from_the_config() -> None:
    buckets = {MINUTE: {b"calling": b"120", b"slots": b"2"}, MINUTE + 2: {b"calling": b"120"}}
    seen = summarize("p", buckets, since=MINUTE * 60, until=(MINUTE + 3) * 60, slots_now=2)
    assert seen.capacity == 3 * 2 * 60
    assert seen.down == 120
    assert seen.largest_loss == ("down", pytest.approx(1 / 3))


@pytest.mark.asyncio
async def test_a_failed_write_is_counted_and_its_seconds_go_with_the_next(
    redis_url: str, r: redis.Redis, pool: str
) -> None:
    write_pool_config(r, pool, slots=1)
    clock = FakeClock()
    slot_time = SlotTime(clock)
    proto = PoolProtocol(pool)
    lease = Lease(proto, 0, "owner", 5.0)
    wall = float(MINUTE * 60 + 10)
    down = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    metrics = SlotMetrics(pool, 0)
    beat = Heartbeat(lease, down, 0.2, metrics=metrics, slot_time=slot_time, wall=lambda: wall)
    clock.now += 3.0
    await beat.beat()  # Redis unreachable: nothing written, the seconds kept
    await beat.close_ledger()
    assert beat.ledger_failures >= 1
    labels = {"pool": pool, "slot": "0"}
    errors = metrics.registry.get_sample_value("apipool_ledger_write_errors_total", labels)
    assert errors == beat.ledger_failures
    assert (
        metrics.registry.get_sample_value(
            "apipool_redis_errors_total", {**labels, "kind": "transient"}
        )
        == 0
    )
    assert not r.exists(proto.keys.ledger(MINUTE))
    async with aioredis.Redis.from_url(redis_url) as up:
        beat.r = up
        slot_time.enter("waiting_for_work")
        clock.now += 2.0
        await beat.beat()
        await beat.close_ledger()
        await asyncio.sleep(0)
    written = floats(r.hgetall(proto.keys.ledger(MINUTE)))
    assert written.pop("slots") == 1
    assert sum(written.values()) == pytest.approx(5.0)  # every second, once
    assert written["starting"] == pytest.approx(3.0)
    assert set(written) <= set(STATES)
    await down.aclose()
