"""Prefetch: a slot takes its next job during a call, only one ahead, only while
the queue holds at least as many jobs as the pool has slots; what it holds is
recovered if it dies and handed back if it stops. Real slot processes."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

import pytest
import redis

from apipool.client import Client
from apipool.layout import PoolKeys
from apipool.stats import write_pool_config
from apipool.testing.polling import wait_for

from .conftest import SlotProcess

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

StartSlot = Callable[..., SlotProcess]
SLEEP = "tests.handlers:sleep"


def start(start_slot: StartSlot, *, prefetch: bool = True) -> SlotProcess:
    slot = start_slot(handler=SLEEP, extra=("--prefetch", "true" if prefetch else "false"))
    wait_for(lambda: slot.status("/readyz") == 200, 15, what="slot ready")
    return slot


def stays(check: Callable[[], bool], seconds: float) -> bool:
    """Whether ``check`` holds at every look for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not check():
            return False
        time.sleep(0.02)
    return True


def attempts(r: redis.Redis, pool: str, job_id: str) -> int:
    record = r.lindex(PoolKeys(pool).result(job_id), 0)
    assert record is not None, job_id
    return int(json.loads(record)["attempt"])


def test_the_next_job_is_taken_during_the_call_when_the_queue_is_long(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    write_pool_config(r, pool, slots=1)
    keys = PoolKeys(pool)
    with Client(redis_url, pool) as client:
        ids = [client.submit({"seconds": 0.6}) for _ in range(3)]
        start(start_slot)
        # One job called, one taken ahead, one left queued: never two ahead.
        wait_for(lambda: r.llen(keys.inflight(0)) == 2, 10, what="one job taken ahead")
        assert stays(lambda: r.llen(keys.inflight(0)) <= 2, 1.0)
        for job_id in ids:
            assert client.wait(job_id, 10).status == "ok"
    assert all(attempts(r, pool, job_id) == 1 for job_id in ids)


def test_no_job_is_taken_ahead_while_the_queue_is_shorter_than_the_pool(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    write_pool_config(r, pool, slots=4)  # three other slots could want these jobs
    keys = PoolKeys(pool)
    with Client(redis_url, pool) as client:
        ids = [client.submit({"seconds": 0.5}) for _ in range(3)]
        start(start_slot)
        wait_for(lambda: r.llen(keys.inflight(0)) == 1, 10, what="a call")
        assert stays(lambda: r.llen(keys.inflight(0)) <= 1, 1.2)
        for job_id in ids:
            assert client.wait(job_id, 10).status == "ok"


def test_prefetch_can_be_switched_off(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    write_pool_config(r, pool, slots=1)
    keys = PoolKeys(pool)
    with Client(redis_url, pool) as client:
        ids = [client.submit({"seconds": 0.4}) for _ in range(4)]
        start(start_slot, prefetch=False)
        wait_for(lambda: r.llen(keys.inflight(0)) == 1, 10, what="a call")
        assert stays(lambda: r.llen(keys.inflight(0)) <= 1, 1.0)
        for job_id in ids:
            assert client.wait(job_id, 10).status == "ok"


def test_both_jobs_are_recovered_when_the_slot_dies(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    write_pool_config(r, pool, slots=1)
    keys = PoolKeys(pool)
    owner = "prefetch-owner"
    with Client(redis_url, pool) as client:
        ids = [client.submit({"seconds": 1.0}) for _ in range(3)]
        slot = start_slot(handler=SLEEP, owner=owner, extra=("--prefetch", "true"))
        wait_for(lambda: r.llen(keys.inflight(0)) == 2, 15, what="one job taken ahead")
        held = {json.loads(raw)["id"] for raw in r.lrange(keys.inflight(0), 0, -1)}
        slot.proc.kill()
        slot.proc.wait(5)
        # Its successor (same owner: it takes the lease over at once) recovers both.
        start_slot(handler=SLEEP, owner=owner, extra=("--prefetch", "false"))
        for job_id in ids:
            assert client.wait(job_id, 20).status == "ok"
    assert {job_id for job_id in ids if attempts(r, pool, job_id) == 2} == held


def test_a_stopping_slot_hands_back_the_job_it_took_ahead(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    write_pool_config(r, pool, slots=1)
    keys = PoolKeys(pool)
    with Client(redis_url, pool) as client:
        first = client.submit({"seconds": 1.0})
        second = client.submit({"seconds": 0.1})
        slot = start(start_slot)
        wait_for(lambda: r.llen(keys.inflight(0)) == 2, 10, what="one job taken ahead")
        slot.proc.send_signal(signal.SIGTERM)
        assert slot.proc.wait(15) == 0
        assert client.wait(first, 1).status == "ok"  # the call in progress finished
        assert r.llen(keys.inflight(0)) == 0
        # The one taken ahead went back to the queue, unchanged (attempt 1, never called).
        (back,) = r.lrange(keys.queue, 0, -1)
        assert json.loads(back)["id"] == second
        assert json.loads(back)["attempt"] == 1
