"""Results that expire unread: COMPLETE adds each ``ok`` result at a job's own
result key to the pool's unread set, a reader takes it off, and SWEEP (run by
the slots, at most once per interval pool-wide) counts the expired ones into
``expired_unread`` and the slot metric apipool_results_expired_unread_total."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import redis

from apipool.client import Client
from apipool.layout import PoolKeys
from apipool.protocol import Outcome, PoolProtocol

from .conftest import SlotProcess, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

StartSlot = Callable[..., SlotProcess]


def metric(slot: SlotProcess, name: str) -> float:
    for line in slot.text("/metrics").splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} on /metrics")


def test_results_nobody_read_are_counted_once_they_expire(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    slots = [start_slot(i, extra=("--result-ttl", "1")) for i in range(2)]
    for slot in slots:
        wait_for(lambda slot=slot: slot.status("/readyz") == 200, 15, what="slot ready")
    with Client(redis_url, pool) as client:
        read, unread = client.submit({"n": 1}), client.submit({"n": 2})
        replied = client.submit({"n": 3})  # read by another reader, by hand (no ZREM)
        assert client.wait(read, 10).status == "ok"
        wait_for(lambda: r.exists(keys.result(unread), keys.result(replied)) == 2, 10,
                 what="the other results")  # fmt: skip
        assert set(r.zrange(keys.unread, 0, -1)) == {unread.encode(), replied.encode()}
        score = r.zscore(keys.unread, unread)
        assert score is not None
        assert abs(score - (time.time() * 1000 + r.pttl(keys.result(unread)))) < 1000
        assert 600_000 < r.pttl(keys.unread) <= 601_000  # the set outlives its members
    dead_id = "no-such-handler"
    r.lpush(keys.queue, json.dumps({"id": dead_id, "payload": 1, "submitted_at": 1,
                                    "attempt": 1, "handler": "x"}))  # fmt: skip
    wait_for(lambda: r.exists(keys.result(dead_id)), 10, what="the dead result")
    assert r.zscore(keys.unread, dead_id) is None  # not a paid call's answer
    # Expired after 1 s; a slot sweeps within SWEEP_INTERVAL_MS (10 s) of the last.
    wait_for(lambda: r.hget(keys.stats, "expired_unread") == b"2", 25, what="the sweep")
    assert r.zcard(keys.unread) == 0
    total = sum(metric(s, "apipool_results_expired_unread_total") for s in slots)
    assert total == 2  # counted by whichever slot swept, once
    time.sleep(0.5)
    assert r.hget(keys.stats, "expired_unread") == b"2"


def test_sweep_is_guarded_bounded_and_counts_only_what_expired(pool: str, r: redis.Redis) -> None:
    keys = PoolKeys(pool)
    proto = PoolProtocol(pool)
    now = int(time.time() * 1000)
    r.zadd(keys.unread, {f"old-{i}": now - 1000 + i for i in range(25)})
    r.zadd(keys.unread, {f"live-{i}": now + 60_000 for i in range(5)})
    assert proto.sweep(now_ms=now, limit=10).run(r) == 10
    assert proto.sweep(now_ms=now, limit=10).run(r) == -1  # guarded: one a period
    assert 0 < r.pttl(keys.sweep) <= 10_000
    r.delete(keys.sweep)
    assert proto.sweep(now_ms=now, interval_ms=50, limit=100).run(r) == 15
    assert set(r.zrange(keys.unread, 0, -1)) == {f"live-{i}".encode() for i in range(5)}
    assert r.hget(keys.stats, "expired_unread") == b"25"


def test_complete_adds_an_ok_result_to_the_unread_set_only_when_asked(
    redis_url: str, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    proto = PoolProtocol(pool)
    for job_id, unread in (("a", "a"), ("b", None)):
        raw = f'{{"id":"{job_id}"}}'.encode()
        r.lpush(keys.inflight(0), raw)
        record = f'{{"id":"{job_id}","status":"ok"}}'
        step = proto.complete(0, raw, result_key=keys.result(job_id), record=record,
                              ttl_ms=5000, outcome=Outcome.OK, unread=unread)  # fmt: skip
        assert step.run(r).code == 1
    assert r.zrange(keys.unread, 0, -1) == [b"a"]
    with Client(redis_url, pool) as client:
        assert client.wait("a", 1).status == "ok"
        assert r.zcard(keys.unread) == 0  # read: taken off
        assert client.wait("a", 1).status == "ok"  # and read again: nothing else changes
    assert r.llen(keys.result("a")) == 1
