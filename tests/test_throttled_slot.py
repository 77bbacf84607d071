"""When the API says "slow down", with real slot processes: a Retry-After pauses
the whole pool, the job keeps its attempt and goes first once the pause ends, a
deadline that passes during the pause expires the job uncalled, a 429 without
Retry-After backs the job off exponentially, and a hostile Retry-After is
clamped to ``--max-pause``. The handler (tests.handlers:slow_down) raises
apipool.RetryAfter as the built-in http handler does on a 429."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from apipool.client import Client
from apipool.layout import PoolKeys
from apipool.stats import write_pool_config
from apipool.testing.polling import wait_for

from .conftest import SlotProcess

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

StartSlot = Callable[..., SlotProcess]
HANDLER = "tests.handlers:slow_down"
HEARD_WITHIN = 0.5
"""Seconds within which every slot honours a pause another slot heard: its
signals are at most 0.2 s old, and a call it started before goes on."""


def calls(log: Path) -> list[tuple[float, str, int, int]]:
    """(start, job id, attempt, slot) of every call the handler logged, in order."""
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
    return sorted((float(t), job, int(a), int(s)) for t, job, a, s in rows)


def started(slots: list[SlotProcess]) -> None:
    for slot in slots:
        wait_for(lambda slot=slot: slot.status("/readyz") == 200, 15, what="slot ready")


def test_retry_after_pauses_the_whole_pool_and_keeps_the_attempt(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    write_pool_config(r, pool, slots=2)
    slots = [start_slot(i, handler=HANDLER) for i in range(2)]
    started(slots)
    log = tmp_path / "calls.log"
    with Client(redis_url, pool) as client:
        first = client.submit({"log": str(log), "times": 1, "retry_after": 2})
        wait_for(lambda: any(job == first for _, job, _, _ in calls(log)), 10, what="a call")
        others = [client.submit({"log": str(log), "seconds": 0.05}) for _ in range(40)]
        told = next(t for t, job, _, _ in calls(log) if job == first)
        done = client.wait(first, 20)
        assert done.status == "ok"
        assert done.attempt == 1  # the API refused it: no attempt used
        for job_id in others:
            assert client.wait(job_id, 20).status == "ok"
    seen = calls(log)
    quiet = [row for row in seen if told + HEARD_WITHIN <= row[0] < told + 2.0]
    assert quiet == [], f"calls during the pool's pause: {quiet}"
    again = [t for t, job, _, _ in seen if job == first][1]
    assert again >= told + 2.0 - 0.05  # its not_before
    assert {s for _, _, _, s in seen} == {0, 1}  # both slots worked
    assert int(r.hget(PoolKeys(pool).stats, "throttled") or 0) == 1
    assert sum(1 for _, job, _, _ in seen if job == first) == 2


def test_a_deadline_that_passes_during_the_pause_expires_the_job_uncalled(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    write_pool_config(r, pool, slots=2)
    started([start_slot(i, handler=HANDLER) for i in range(2)])
    log = tmp_path / "calls.log"
    with Client(redis_url, pool) as client:
        paused = client.submit({"log": str(log), "times": 1, "retry_after": 3})
        wait_for(lambda: calls(log), 10, what="the first call")
        wait_for(lambda: r.exists(PoolKeys(pool).pause), 10, what="the pool paused")
        deadline = time.time() + 1.0
        soon = client.submit({"log": str(log)}, deadline=deadline)
        answer = client.wait(soon, 10)
        assert answer.status == "expired"
        assert answer.error is not None
        assert "API takes calls again" in answer.error
        assert answer.finished_at is not None
        assert answer.finished_at < deadline  # answered at once, not at its deadline
        assert client.wait(paused, 20).status == "ok"
    assert soon not in {job for _, job, _, _ in calls(log)}


def test_without_retry_after_the_job_backs_off_exponentially(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    write_pool_config(r, pool, slots=1)
    started([start_slot(handler=HANDLER)])
    log = tmp_path / "calls.log"
    with Client(redis_url, pool) as client:
        job_id = client.submit({"log": str(log), "times": 4})
        result = client.wait(job_id, 30)
    assert result.status == "ok"
    assert result.attempt == 1
    times = [t for t, _, _, _ in calls(log)]
    assert len(times) == 5
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for k, gap in enumerate(gaps[:4]):
        assert gap >= 0.1 * 2**k / 2 - 0.01, gaps  # at least half of base x 2^k
    assert int(r.hget(PoolKeys(pool).stats, "throttled") or 0) == 4
    assert r.get(PoolKeys(pool).pause) is None  # no Retry-After: no pool-wide pause


def test_a_hostile_retry_after_is_clamped_to_max_pause(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    write_pool_config(r, pool, slots=1)
    slot = start_slot(handler=HANDLER, extra=("--max-pause", "1"))
    started([slot])
    log = tmp_path / "calls.log"
    with Client(redis_url, pool) as client:
        job_id = client.submit({"log": str(log), "times": 1, "retry_after": 10**9})
        assert client.wait(job_id, 20).status == "ok"
    first, second = (t for t, _, _, _ in calls(log))
    assert 0.9 <= second - first < 10
    assert "(max_pause)" in slot.log.read_text()
