"""A slot's in-flight list on a real redis: takes, outcomes, hand-backs, recovery."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from apipool.envelope import Envelope, make_envelope, parse_envelope, result_record
from apipool.inflight import InFlight
from apipool.protocol import Outcome, PoolProtocol
from apipool.settings import SlotSettings, Timings

from .conftest import async_wait_for

pytestmark = [pytest.mark.redis, pytest.mark.asyncio, pytest.mark.timeout(30)]

TIMINGS = Timings(call_timeout=0.2, heartbeat_interval=0.1, take_block=0.2)


@pytest_asyncio.fixture
async def ar(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    yield client
    await client.aclose()


def settings(pool: str, redis_url: str = "", max_attempts: int = 3) -> SlotSettings:
    return SlotSettings(
        pool=pool, slot=0, redis_url=redis_url, timings=TIMINGS, max_attempts=max_attempts
    )


def in_flight(
    pool: str,
    r: aioredis.Redis,
    *,
    may_take_next: bool = True,
    stopping: asyncio.Event | None = None,
    max_attempts: int = 3,
) -> InFlight:
    return InFlight(
        PoolProtocol(pool),
        settings(pool, max_attempts=max_attempts),
        r,
        stopping=stopping or asyncio.Event(),
        may_take_next=lambda: may_take_next,
    )


def queue(r: redis.Redis, pool: str, *envs: Envelope) -> list[bytes]:
    """Queue envelopes oldest first; returns their raw bytes."""
    raws = [env.to_json().encode() for env in envs]
    for raw in raws:
        r.lpush(PoolProtocol(pool).keys.queue, raw)
    return raws


def ok_record(env: Envelope) -> str:
    return result_record(job_id=env.id, status=Outcome.OK, attempt=env.attempt, slot=0)


def counters(r: redis.Redis, pool: str) -> dict[str, int]:
    raw = r.hgetall(PoolProtocol(pool).keys.stats)
    return {k.decode(): int(v) for k, v in raw.items()}


async def test_take_moves_the_oldest_job_into_flight(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    keys = PoolProtocol(pool).keys
    first, second = queue(r, pool, make_envelope(1), make_envelope(2))
    jobs = in_flight(pool, ar)
    assert await jobs.take() == first
    assert r.lrange(keys.inflight(0), 0, -1) == [first]
    assert r.lrange(keys.queue, 0, -1) == [second]
    assert await jobs.holds(first)
    assert not await jobs.holds(second)


async def test_take_on_an_empty_queue_gives_up_after_take_block(
    ar: aioredis.Redis, pool: str
) -> None:
    started = time.monotonic()
    assert await in_flight(pool, ar).take() is None
    assert TIMINGS.take_block * 0.9 <= time.monotonic() - started < TIMINGS.take_block + 2


async def test_an_outcome_takes_the_next_job_along_in_the_same_step(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    keys = PoolProtocol(pool).keys
    first_env, second_env = make_envelope(1), make_envelope(2)
    first, second = queue(r, pool, first_env, second_env)
    jobs = in_flight(pool, ar)
    await jobs.take()
    done = await jobs.complete(
        first,
        job_id=first_env.id,
        reply_to=None,
        record=ok_record(first_env),
        outcome=Outcome.OK,
        take_next=True,
    )
    assert done
    assert json.loads(r.lindex(keys.result(first_env.id), 0))["status"] == "ok"
    assert r.lrange(keys.inflight(0), 0, -1) == [second]
    assert r.llen(keys.queue) == 0
    assert jobs.pop_next() == second
    assert jobs.pop_next() is None  # handed out once
    assert counters(r, pool)["ok"] == 1


async def test_nothing_is_taken_along_unless_a_call_could_start(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    keys = PoolProtocol(pool).keys
    first_env, second_env = make_envelope(1), make_envelope(2)
    first, second = queue(r, pool, first_env, second_env)
    jobs = in_flight(pool, ar, may_take_next=False)
    await jobs.take()
    await jobs.complete(
        first,
        job_id=first_env.id,
        reply_to=None,
        record=ok_record(first_env),
        outcome=Outcome.OK,
        take_next=True,
    )
    assert jobs.pop_next() is None
    assert r.llen(keys.inflight(0)) == 0
    assert r.lrange(keys.queue, 0, -1) == [second]


async def test_hand_back_puts_the_job_first_in_line_unchanged(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    keys = PoolProtocol(pool).keys
    first, second = queue(r, pool, make_envelope(1), make_envelope(2))
    jobs = in_flight(pool, ar)
    await jobs.take()
    assert await jobs.hand_back(first)
    assert r.llen(keys.inflight(0)) == 0
    assert r.lrange(keys.queue, 0, -1) == [second, first]  # first is taken next again
    assert counters(r, pool) == {}  # not an outcome


async def test_retry_queues_the_next_attempt_at_the_back(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    keys = PoolProtocol(pool).keys
    env = make_envelope({"x": 1})
    (raw,) = queue(r, pool, env)
    other = make_envelope(2)
    (other_raw,) = queue(r, pool, other)
    jobs = in_flight(pool, ar)
    await jobs.take()
    assert await jobs.retry(raw, env)
    waiting = r.lrange(keys.queue, 0, -1)
    assert waiting[-1] == other_raw  # the other job goes first
    again = parse_envelope(waiting[0])
    assert (again.id, again.attempt, again.payload) == (env.id, 2, {"x": 1})
    assert counters(r, pool)["retried"] == 1


async def test_a_job_no_longer_in_flight_gets_no_outcome_here(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    keys = PoolProtocol(pool).keys
    env = make_envelope(1)
    raw = env.to_json().encode()
    done = await in_flight(pool, ar).complete(
        raw, job_id=env.id, reply_to=None, record=ok_record(env), outcome=Outcome.OK
    )
    assert not done
    assert r.exists(keys.result(env.id)) == 0
    assert counters(r, pool) == {}


async def test_a_predecessors_jobs_cost_an_attempt_or_are_dead_lettered(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    keys = PoolProtocol(pool).keys
    early = make_envelope("early")
    last = Envelope(id="last-one", payload="last", submitted_at=time.time(), attempt=3)
    r.lpush(keys.inflight(0), early.to_json(), last.to_json())
    await in_flight(pool, ar, max_attempts=3).recover_predecessor()
    assert r.llen(keys.inflight(0)) == 0
    (retried,) = r.lrange(keys.queue, 0, -1)
    assert (parse_envelope(retried).id, parse_envelope(retried).attempt) == (early.id, 2)
    record = json.loads(r.lindex(keys.result("last-one"), 0))
    assert record["status"] == "dead"
    assert record["error"] == "slot died during attempt 3 of 3"
    assert json.loads(r.lindex(keys.dead, 0))["id"] == "last-one"
    assert counters(r, pool) == {"recovered": 1, "dead": 1}


async def test_a_take_that_failed_makes_the_slot_look_for_strays_once(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    """A take whose connection breaks may still have moved a job: it is handed
    back (unchanged, first in line) before the next take, and only then."""
    keys = PoolProtocol(pool).keys
    jobs = in_flight(pool, ar)
    taking = asyncio.create_task(jobs.take())

    def blocked_take() -> int | None:
        for client in r.client_list():
            if client.get("cmd") == "blmove":
                return int(client["id"])
        return None

    client_id = await async_wait_for(blocked_take, 10, what="a blocked BLMOVE")
    r.client_kill_filter(_id=client_id)
    with pytest.raises(RedisError):
        await taking
    assert jobs.maybe_stray
    stray = make_envelope("stray").to_json().encode()
    r.lpush(keys.inflight(0), stray)  # as if the move had happened, its reply lost
    await jobs.hand_back_strays()
    assert not jobs.maybe_stray
    assert r.llen(keys.inflight(0)) == 0
    assert r.lrange(keys.queue, 0, -1) == [stray]
    r.lpush(keys.inflight(0), stray)
    await jobs.hand_back_strays()  # no reply lost since: nothing to look at
    assert r.lrange(keys.inflight(0), 0, -1) == [stray]


async def test_writes_are_retried_until_a_stop_outlasts_the_grace(pool: str) -> None:
    unreachable = aioredis.Redis.from_url(
        "redis://127.0.0.1:1/0", socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    stopping = asyncio.Event()
    jobs = in_flight(pool, unreachable, stopping=stopping)
    env = make_envelope(1)
    writing = asyncio.create_task(
        jobs.complete(
            env.to_json().encode(),
            job_id=env.id,
            reply_to=None,
            record=ok_record(env),
            outcome=Outcome.OK,
        )
    )
    done, _ = await asyncio.wait({writing}, timeout=1.5)
    assert not done  # not stopping: it keeps trying
    assert jobs.maybe_stray
    stopped_at = time.monotonic()
    stopping.set()
    assert await asyncio.wait_for(writing, TIMINGS.shutdown_grace + 10) is False
    assert time.monotonic() - stopped_at >= TIMINGS.shutdown_grace
    await unreachable.aclose()
