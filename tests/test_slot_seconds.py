"""Real slot processes account every second: /metrics and the pool's ledger.

- each slot's ``apipool_slot_seconds_total`` states grow exactly as wall time
  does (within 1 %), with and without work;
- the ledger's states plus ``down`` are N x the wall time of the range, and
  the states are what the slots lived (within 1 %), also with a slot killed
  (then ``down`` > 0: the dead slot's index had no process).
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from apipool import Client
from apipool.layout import PoolKeys
from apipool.ledger import read_ledger
from apipool.slot_time import STATES
from apipool.stats import write_pool_config

from .conftest import SlotProcess, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.chaos, pytest.mark.timeout(90)]

StartSlot = Callable[..., SlotProcess]
N = 3


def slot_seconds(slot: SlotProcess) -> dict[str, float]:
    """apipool_slot_seconds_total of one slot, per state."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(slot.text("/metrics")):
        for sample in family.samples:
            if sample.name == "apipool_slot_seconds_total":
                found[sample.labels["state"]] = sample.value
    return found


def timed_read(slot: SlotProcess) -> tuple[float, float, dict[str, float]]:
    """(wall time of the read, sum of the states, the states)."""
    before = time.time()
    states = slot_seconds(slot)
    after = time.time()
    return (before + after) / 2, sum(states.values()), states


def final_accounting(slot: SlotProcess) -> float:
    """The seconds a stopped slot logged as accounted (and written) at its stop."""
    found = re.search(r"slot \d+ accounted ([0-9.]+) s: ", slot.output())
    assert found is not None, slot.output()
    return float(found[1])


def grows_with_wall_time(
    first: tuple[float, float, dict[str, float]], second: tuple[float, float, dict[str, float]]
) -> None:
    wall = second[0] - first[0]
    assert wall > 1.0
    assert second[1] - first[1] == pytest.approx(wall, rel=0.01)


def test_each_slot_and_the_ledger_account_for_every_second(
    start_slot: StartSlot, r: redis.Redis, redis_url: str, pool: str
) -> None:
    write_pool_config(r, pool, slots=N)
    started = time.time()
    slots = [start_slot(i, handler="tests.handlers:sleep", heartbeat=0.1) for i in range(N)]
    for slot in slots:
        wait_for(lambda s=slot: s.status("/readyz") == 200, 20, what="slot ready")
    # Without work: the slots wait for it.
    idle = [timed_read(s) for s in slots]
    time.sleep(1.5)
    with Client(redis_url, pool) as client:
        client.submit_many([{"seconds": 0.1} for _ in range(40)])
        wait_for(lambda: r.llen(PoolKeys(pool).queue) == 0, 20, what="queue drained")
    busy = [timed_read(s) for s in slots]
    for before, after in zip(idle, busy, strict=True):
        grows_with_wall_time(before, after)
        assert set(after[2]) == set(STATES)
        assert after[2]["starting"] > 0
        assert after[2]["waiting_for_work"] > before[2]["waiting_for_work"]
        assert after[2]["calling"] > 0.3  # about 40 x 0.1 s over 3 slots
        assert after[1] <= after[0] - started  # never more than the process lived

    # Kill one; stop the others gracefully (each writes its last seconds and logs
    # what it accounted: the ledger's states are those, and the killed slot's
    # seconds up to its last beat).
    killed_at_read = timed_read(slots[2])
    slots[2].signal(signal.SIGKILL)
    killed = time.time()
    slots[2].wait(10)
    time.sleep(2.0)
    lived = 0.0  # what the graceful slots accounted in their whole lives
    for slot in slots[:2]:
        last = timed_read(slot)
        slot.signal(signal.SIGTERM)
        assert slot.wait(20) == 0
        accounted = final_accounting(slot)
        assert accounted >= last[1]
        assert accounted <= last[1] + (time.time() - last[0])  # never more than it lived
        lived += accounted
    killed_low = killed_at_read[1] + (killed - killed_at_read[0]) - 0.15  # a beat not written
    killed_high = killed_at_read[1] + (killed - killed_at_read[0])
    now = time.time()
    seen = read_ledger(r, pool, seconds=now - started + 1, now=now)
    assert seen.slots == N
    assert seen.capacity == pytest.approx(N * (now - seen.since), rel=1e-6)
    assert seen.accounted + seen.down == pytest.approx(N * (now - seen.since), rel=0.01)
    low, high = lived + killed_low, lived + killed_high
    slack = 0.01 * high
    assert low - slack <= seen.accounted <= high + slack, (low, seen.accounted, high)
    assert seen.down >= now - killed  # the killed slot's index had no process since
    assert seen.states["calling"] > 0.3
    assert seen.utilization is not None
    assert 0 < seen.utilization < 1
