"""The demo's live view shows where the slots' time went (from the pool's ledger)."""

from __future__ import annotations

import pytest
import redis

from apipool.demo.slot_states import LedgerWatch, shares_of
from apipool.demo.view import render_panel
from apipool.protocol import PoolProtocol
from apipool.stats import write_pool_config
from apipool.testing.clock import FakeClock

from .test_demo import plain, snap


@pytest.mark.unit
def test_shares_are_of_the_capacity_and_the_rest_is_down() -> None:
    shares = shares_of({"calling": 30.0, "waiting_for_work": 10.0, "fenced": 0.0}, 50.0)
    assert shares == pytest.approx({"calling": 0.6, "waiting_for_work": 0.2, "down": 0.2})
    assert shares_of({"calling": 60.0}, 50.0)["down"] == 0  # never negative
    assert shares_of({"calling": 1.0}, 0.0) == {}


@pytest.mark.unit
def test_the_panel_shows_the_slot_time_and_still_fits_80_columns() -> None:
    states = {"calling": 0.85, "waiting_for_work": 0.1, "handoff": 0.02, "down": 0.03}
    text = plain(render_panel(snap(), limit=4, duration=30.0, states=states), width=80)
    assert "slot time" in text
    assert "calling 85%" in text
    assert "waiting for work 10%" in text
    assert "down 3%" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    without = plain(render_panel(snap(), limit=4, duration=30.0), width=80)
    assert "slot time" not in without


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_the_watch_finds_the_new_pool_and_reads_its_ledger(
    r: redis.Redis, redis_url: str, pool: str
) -> None:
    write_pool_config(r, f"{pool}-older", slots=9)  # there before the run: not ours
    clock = FakeClock()
    clock.now = float(int(r.time()[0]) // 60 * 60 + 10)  # 10 s into a minute
    watch = LedgerWatch(redis_url, slots=2, clock=clock)
    try:
        assert watch.refresh() is None  # no new pool yet
        write_pool_config(r, pool, slots=2)
        minute = int(clock.now // 60)
        PoolProtocol(pool).ledger({minute: {"calling": 12.0, "held_back": 4.0}}).run(r)
        clock.now += 10.0  # 2 slots x 10 s since the watch began
        shares = watch.refresh()
        assert watch.pool == pool
        assert shares == pytest.approx({"calling": 0.6, "held_back": 0.2, "down": 0.2})
    finally:
        watch.close()
