"""The operator reads the pool's ledger: utilization and the largest loss in the
status, the pool's gauges and its slot-seconds counter on /metrics."""

from __future__ import annotations

import time

import pytest
import redis
from prometheus_client import REGISTRY

from apipool.layout import PoolKeys
from apipool.ledger import SlotSeconds
from apipool.operator.metrics import CLOSE_AFTER, LedgerTally
from apipool.protocol import PoolProtocol

from .conftest import NAMESPACE, TIMER_INTERVAL, Cluster, OperatorThread, wait_for

pytestmark = [pytest.mark.operator, pytest.mark.redis]


def sample(name: str, pool: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"namespace": NAMESPACE, "pool": pool, **labels})


@pytest.mark.timeout(30)
def test_the_status_and_metrics_show_where_the_slot_seconds_went(
    cluster: Cluster, operator: OperatorThread, r: redis.Redis
) -> None:
    pool = cluster.new_name()
    cluster.create_pool(pool, slots=2)
    wait_for(lambda: cluster.status(pool).get("desiredSlots") == 2, 5, what="a status")
    # The last two minutes as two slots would have written them: the older
    # one is over (its down is final), the current one goes on.
    now = time.time()
    minute = int(now // 60)
    # Both minutes in one step, so that no status pass sees half of them; the
    # operator's timer may run at any moment in between, so wait for a status
    # that shows both the ledger and the lowered effective concurrency.
    r.set(PoolKeys(pool).effective, 1)
    buckets = {minute - 1: {"calling": 30.0, "waiting_for_work": 60.0}, minute: {"calling": 1.0}}
    PoolProtocol(pool).ledger(buckets).run(r)

    def shows_it() -> bool:
        status = cluster.status(pool)
        return status.get("largestLoss") is not None and status.get("effectiveSlots") == 1

    wait_for(shows_it, 2 * TIMER_INTERVAL + 5, what="status.largestLoss and effectiveSlots 1")
    status = cluster.status(pool)
    cause, share = status["largestLoss"]["cause"], status["largestLoss"]["share"]
    # The window (60 s) reaches into the previous minute: both are counted.
    elapsed = time.time() - minute * 60
    capacity = 2 * 60 + 2 * elapsed
    assert status["utilization"] == pytest.approx(31 / capacity, abs=0.02)
    down = capacity - 91  # the previous minute's 30 s, and the current one's gap
    if abs(down - 60) > 6:  # not too close to call (the status was written a moment ago)
        assert cause == ("down" if down > 60 else "waiting_for_work")
        assert share == pytest.approx(max(down, 60) / capacity, abs=0.03)

    assert sample("apipool_pool_slots", pool) == 2
    assert sample("apipool_pool_effective_slots", pool) == 1
    assert sample("apipool_pool_queue_length", pool) == 0
    assert sample("apipool_pool_dead_letters", pool) == 0
    assert sample("apipool_pool_utilization", pool) == status["utilization"]
    seconds = "apipool_pool_slot_seconds_total"
    assert sample(seconds, pool, state="calling") == 31
    assert sample(seconds, pool, state="waiting_for_work") == 60
    assert sample(seconds, pool, state="held_back") == 0
    if time.time() >= minute * 60 + CLOSE_AFTER:
        wait_for(lambda: sample(seconds, pool, state="down") == 30, 2 * TIMER_INTERVAL + 3)

    cluster.delete_pool(pool)
    wait_for(lambda: sample("apipool_pool_slots", pool) is None, 10, what="series removed")
    assert sample(seconds, pool, state="calling") is None


@pytest.mark.unit
def test_the_tally_counts_each_second_once_and_down_once_a_minute_is_over() -> None:
    tally = LedgerTally()

    def minute(start: float, calling: float, until: float) -> SlotSeconds:
        end = min(until, start + 60)
        return SlotSeconds("p", start, end, 2, 2 * (end - start), {"calling": calling})

    now = 6000.0 + 30
    assert tally.increments([minute(6000.0, 10.0, now)], now) == {"calling": 10.0}
    assert tally.increments([minute(6000.0, 10.0, now)], now) == {}  # read again: nothing new
    now = 6060.0 + CLOSE_AFTER + 1
    seen = tally.increments([minute(6000.0, 25.0, now), minute(6060.0, 5.0, now)], now)
    assert seen == {"calling": 20.0, "down": 120 - 25}
    assert tally.increments([minute(6000.0, 25.0, now)], now + 10) == {}
