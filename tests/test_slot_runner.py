"""Self-fencing and a job's way to its outcome, in process, on a real redis.

The lease runs on a fake clock, so "the lease is too short for a call" is a
fact the test sets, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from apipool.envelope import Envelope, make_envelope
from apipool.handlers import Call, Handler
from apipool.inflight import InFlight
from apipool.job_runner import JobRunner
from apipool.lease import Lease
from apipool.metrics import SlotMetrics
from apipool.probes import CallTracker
from apipool.protocol import PoolProtocol
from apipool.settings import SlotSettings, Timings
from apipool.testing.clock import FakeClock

pytestmark = [pytest.mark.redis, pytest.mark.asyncio, pytest.mark.timeout(30)]

TIMINGS = Timings(call_timeout=2.0, fence_margin=1.0, heartbeat_interval=0.1, take_block=0.1)
BUDGET = TIMINGS.call_timeout + TIMINGS.fence_margin
LEASE_TTL = 10.0


@pytest_asyncio.fixture
async def ar(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    yield client
    await client.aclose()


@dataclass
class Calls:
    """Handler calls seen, by job id."""

    seen: list[tuple[str, int]] = field(default_factory=list)

    def handler(self, result: Callable[[Any], Any] = lambda payload: payload) -> Handler:
        async def record(payload: Any, call: Call) -> Any:
            self.seen.append((call.job_id, call.attempt))
            return result(payload)

        return Handler(name="record", spec="record", fn=record, is_async=True)


@dataclass
class Rig:
    """A JobRunner wired as in a slot, with a fake clock under its lease."""

    r: aioredis.Redis
    sync: redis.Redis
    pool: str
    clock: FakeClock
    lease: Lease
    inflight: InFlight
    metrics: SlotMetrics
    stopping: asyncio.Event
    runner: JobRunner = field(init=False)
    on_wait: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Actions run, one per wait, in place of the heartbeat's next beat."""
    waits: int = 0

    @property
    def keys(self) -> Any:
        return PoolProtocol(self.pool).keys

    async def wait_lease_change(self, timeout: float) -> None:
        """Stands in for the heartbeat: runs the next scripted action, if any."""
        self.waits += 1
        if self.on_wait:
            await self.on_wait.pop(0)()
        else:
            await asyncio.sleep(timeout)

    async def take(self, env: Envelope) -> bytes:
        raw = env.to_json().encode()
        self.sync.lpush(self.keys.queue, raw)
        assert await self.inflight.take() == raw
        return raw

    def count(self, outcome: str) -> float:
        labels = {"pool": self.pool, "slot": "0", "outcome": outcome}
        return self.metrics.registry.get_sample_value("apipool_calls_total", labels) or 0.0

    def failures(self, cause: str) -> float:
        labels = {"pool": self.pool, "slot": "0", "cause": cause}
        return self.metrics.registry.get_sample_value("apipool_failures_total", labels) or 0.0

    def calls_running(self) -> bool:
        return self.runner.calls.running

    def result(self, job_id: str) -> dict[str, Any]:
        raw = self.sync.lindex(self.keys.result(job_id), 0)
        assert raw is not None, f"no result for {job_id}"
        doc: dict[str, Any] = json.loads(raw)
        return doc


async def make_rig(
    ar: aioredis.Redis,
    r: redis.Redis,
    pool: str,
    handlers: dict[str, Handler],
    *,
    timings: Timings = TIMINGS,
    max_attempts: int = 3,
) -> Rig:
    settings = SlotSettings(pool=pool, slot=0, timings=timings, max_attempts=max_attempts)
    proto = PoolProtocol(pool)
    clock = FakeClock()
    lease = Lease(proto, 0, "owner", LEASE_TTL, clock=clock)
    stopping = asyncio.Event()
    inflight = InFlight(proto, settings, ar, stopping=stopping)
    metrics = SlotMetrics(pool, 0)
    rig = Rig(ar, r, pool, clock, lease, inflight, metrics, stopping)
    rig.runner = JobRunner(
        settings,
        {"": next(iter(handlers.values())), **handlers},
        lease=lease,
        inflight=inflight,
        calls=CallTracker(),
        metrics=metrics,
        stopping=stopping,
        wait_lease_change=rig.wait_lease_change,
    )
    inflight.may_take_next = rig.runner.may_take  # as a slot wires it
    assert (await lease.acquire(ar)).held
    return rig


# -- self-fencing ------------------------------------------------------------------------


async def test_a_call_starts_at_once_while_the_lease_covers_it(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    rig = await make_rig(ar, r, pool, {"record": Calls().handler()})
    raw = await rig.take(make_envelope(1))
    rig.clock.advance(LEASE_TTL - BUDGET - 0.01)  # just enough left
    assert await rig.runner.fence(raw, rig.lease.epoch)
    assert rig.waits == 0


async def test_a_call_waits_until_the_lease_leaves_room_for_it(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    rig = await make_rig(ar, r, pool, {"record": Calls().handler()})
    raw = await rig.take(make_envelope(1))
    rig.clock.advance(LEASE_TTL - BUDGET + 0.01)  # a whole call would outlive the lease

    async def renewed() -> None:
        assert await rig.lease.renew(ar)

    rig.on_wait.append(renewed)
    assert await rig.runner.fence(raw, rig.lease.epoch)
    assert rig.waits == 1
    assert rig.lease.remaining() == pytest.approx(LEASE_TTL)


async def test_a_stop_while_fenced_hands_the_job_back_unrun(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    calls = Calls()
    rig = await make_rig(ar, r, pool, {"record": calls.handler()})
    older = make_envelope("older")
    raw = await rig.take(make_envelope("fenced"))
    r.lpush(rig.keys.queue, older.to_json())
    rig.clock.advance(LEASE_TTL - 1.0)  # 1 s left: less than a call
    rig.stopping.set()
    await rig.runner.run(raw, rig.lease.epoch)
    assert calls.seen == []
    assert r.llen(rig.keys.inflight(0)) == 0
    assert r.lindex(rig.keys.queue, -1) == raw  # first in line, unchanged
    assert r.exists(rig.keys.stats) == 0  # no outcome counted


async def test_a_surplus_slot_starts_no_call(ar: aioredis.Redis, r: redis.Redis, pool: str) -> None:
    calls = Calls()
    rig = await make_rig(ar, r, pool, {"record": calls.handler()})
    r.hset(rig.keys.config, "slots", 0)
    assert await rig.lease.check_pool_size(ar)
    raw = await rig.take(make_envelope(1))

    async def stop() -> None:
        rig.stopping.set()

    rig.on_wait.append(stop)
    await rig.runner.run(raw, rig.lease.epoch)
    assert calls.seen == []
    assert r.lindex(rig.keys.queue, -1) == raw


async def lose_and_win_again(rig: Rig) -> None:
    rig.sync.set(rig.keys.lease(0), b"intruder/1", px=60_000)
    assert not await rig.lease.renew(rig.r)
    rig.sync.delete(rig.keys.lease(0))
    assert (await rig.lease.acquire(rig.r)).held


async def test_a_job_taken_before_a_lease_loss_is_called_if_still_ours(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    calls = Calls()
    rig = await make_rig(ar, r, pool, {"record": calls.handler()})
    env = make_envelope(1)
    raw = await rig.take(env)
    epoch = rig.lease.epoch
    await lose_and_win_again(rig)
    assert rig.lease.epoch == epoch + 1
    await rig.runner.run(raw, epoch)
    assert calls.seen == [(env.id, 1)]
    assert rig.result(env.id)["status"] == "ok"


async def test_a_job_recovered_elsewhere_during_a_lease_loss_is_dropped_here(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    calls = Calls()
    rig = await make_rig(ar, r, pool, {"record": calls.handler()})
    env = make_envelope(1)
    raw = await rig.take(env)
    epoch = rig.lease.epoch
    r.delete(rig.keys.inflight(0))  # someone recovered it while the lease was not ours
    await lose_and_win_again(rig)
    await rig.runner.run(raw, epoch)
    assert calls.seen == []
    assert r.llen(rig.keys.queue) == 0  # not requeued by us either
    assert r.exists(rig.keys.result(env.id)) == 0


async def test_a_job_that_reaches_the_list_after_the_lease_was_lost_goes_back_uncalled(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    """A take sent before a SIGSTOP may move a job in after another owner took the
    slot over (and recovered its list): the job must not wait here for a lease
    that does not come back, stranded in the other owner's list."""
    calls = Calls()
    rig = await make_rig(ar, r, pool, {"record": calls.handler()})
    env = make_envelope("late")
    raw = await rig.take(env)
    epoch = rig.lease.epoch
    r.set(rig.keys.lease(0), b"pod-b/1", px=60_000)  # the new owner
    assert not await rig.lease.renew(ar)
    await rig.runner.run(raw, epoch)
    assert calls.seen == []
    assert rig.waits == 0  # did not wait for the lease
    assert r.llen(rig.keys.inflight(0)) == 0
    assert r.lrange(rig.keys.queue, 0, -1) == [raw]  # unchanged, first in line
    assert r.get(rig.keys.lease(0)) == b"pod-b/1"


async def test_a_job_is_taken_only_while_a_take_and_a_whole_call_still_fit(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    rig = await make_rig(ar, r, pool, {"record": Calls().handler()})
    needed = BUDGET + TIMINGS.take_block
    rig.clock.advance(LEASE_TTL - needed - 0.01)
    assert rig.runner.may_take()
    rig.clock.advance(0.02)
    assert not rig.runner.may_take()
    assert await rig.lease.renew(ar)
    assert rig.runner.may_take()
    rig.stopping.set()
    assert not rig.runner.may_take()


# -- a job's way to its outcome ------------------------------------------------------------


async def test_a_successful_call_is_answered_and_takes_the_next_job_along(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    calls = Calls()
    rig = await make_rig(ar, r, pool, {"record": calls.handler(lambda p: {"got": p})})
    env, following = make_envelope("a"), make_envelope("b")
    raw = await rig.take(env)
    r.lpush(rig.keys.queue, following.to_json())
    await rig.runner.run(raw, rig.lease.epoch)
    record = rig.result(env.id)
    assert (record["status"], record["result"], record["attempt"]) == ("ok", {"got": "a"}, 1)
    assert record["started_at"] is not None
    assert rig.inflight.pop_next() == following.to_json().encode()
    assert r.llen(rig.keys.queue) == 0
    assert rig.count("ok") == 1.0


async def test_failures_are_retried_then_dead_lettered_with_their_cause(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    def refuse(payload: Any) -> Any:
        raise ConnectionError("the API said no")

    rig = await make_rig(ar, r, pool, {"record": Calls().handler(refuse)}, max_attempts=2)
    env = make_envelope(1)
    await rig.runner.run(await rig.take(env), rig.lease.epoch)
    assert rig.count("retried") == 1.0
    again = rig.inflight.pop_next()  # back of an empty line: taken along at once
    assert again is not None
    assert json.loads(again)["attempt"] == 2
    await rig.runner.run(again, rig.lease.epoch)
    record = rig.result(env.id)
    assert record["status"] == "dead"
    assert record["error"] == "attempt 2 of 2 failed: ConnectionError: the API said no"
    assert rig.count("dead") == 1.0
    assert rig.failures("error") == 2.0


async def test_an_async_call_past_its_timeout_is_cancelled_and_retried(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    async def slow(payload: Any, call: Call) -> None:
        await asyncio.sleep(30)

    handler = Handler(name="slow", spec="slow", fn=slow, is_async=True)
    timings = Timings(call_timeout=0.2, heartbeat_interval=0.1, take_block=0.1)
    rig = await make_rig(ar, r, pool, {"slow": handler}, timings=timings)
    started = time.monotonic()
    await rig.runner.run(await rig.take(make_envelope(1)), rig.lease.epoch)
    assert time.monotonic() - started < 5
    assert not rig.runner.overrun  # cancelled: nothing left running
    assert rig.count("retried") == 1.0
    assert rig.failures("timeout") == 1.0


async def test_a_sync_call_past_its_timeout_is_an_overrun(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    release = threading.Event()

    def blocking(payload: Any, call: Call) -> None:
        release.wait(10)  # a sync call that ignores its timeout

    handler = Handler(name="block", spec="block", fn=blocking, is_async=False)
    timings = Timings(call_timeout=0.2, heartbeat_interval=0.1, take_block=0.1)
    rig = await make_rig(ar, r, pool, {"block": handler}, timings=timings)
    raw = await rig.take(make_envelope(1))
    waiting = make_envelope(2).to_json().encode()
    r.lpush(rig.keys.queue, waiting)
    await rig.runner.run(raw, rig.lease.epoch)
    try:
        assert rig.runner.overrun  # its thread still runs: the process must go
        assert not rig.runner.may_take()
        assert rig.failures("timeout") == 1.0
        assert rig.inflight.pop_next() is None  # nothing taken along by a slot that must go
        assert r.lrange(rig.keys.queue, 0, -1)[-1] == waiting
    finally:
        release.set()


async def test_an_expired_job_is_answered_without_a_call(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    calls = Calls()
    rig = await make_rig(ar, r, pool, {"record": calls.handler()})
    env = make_envelope(1, deadline=time.time() - 1)
    await rig.runner.run(await rig.take(env), rig.lease.epoch)
    assert calls.seen == []
    assert rig.result(env.id)["status"] == "expired"
    assert rig.count("expired") == 1.0


async def test_unknown_handler_and_bad_reply_to_are_dead_lettered_uncalled(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    calls = Calls()
    rig = await make_rig(ar, r, pool, {"record": calls.handler()})
    unknown = make_envelope(1, handler="nope")
    await rig.runner.run(await rig.take(unknown), rig.lease.epoch)
    assert "unknown handler 'nope'; this pool serves: record" in rig.result(unknown.id)["error"]
    stray_reply = make_envelope(2, reply_to="somewhere:else")
    await rig.runner.run(await rig.take(stray_reply), rig.lease.epoch)
    assert "reply_to must be a key under" in rig.result(stray_reply.id)["error"]
    assert r.exists("somewhere:else") == 0
    assert calls.seen == []
    assert rig.failures("unknown handler") == 1.0
    assert rig.failures("malformed") == 1.0
    assert r.llen(rig.keys.dead) == 2


# -- what a handler may throw ----------------------------------------------------------------


async def test_a_cancelled_error_of_the_handlers_own_is_a_failure_not_a_stop(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    async def inner_cancelled(payload: Any, call: Call) -> None:
        raise asyncio.CancelledError("an inner task of the handler was cancelled")

    handler = Handler(name="c", spec="c", fn=inner_cancelled, is_async=True)
    rig = await make_rig(ar, r, pool, {"c": handler})
    await rig.runner.run(await rig.take(make_envelope(1)), rig.lease.epoch)
    assert rig.count("retried") == 1.0  # an ordinary failure: it may work next time
    assert not rig.calls_running()


async def test_a_cancel_of_the_slot_during_a_call_goes_through(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    started = asyncio.Event()

    async def slow(payload: Any, call: Call) -> None:
        started.set()
        await asyncio.sleep(30)

    handler = Handler(name="slow", spec="slow", fn=slow, is_async=True)
    rig = await make_rig(ar, r, pool, {"slow": handler})
    raw = await rig.take(make_envelope(1))
    running = asyncio.create_task(rig.runner.run(raw, rig.lease.epoch))
    await asyncio.wait_for(started.wait(), 10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 10)
    assert not rig.calls_running()
    assert r.lrange(rig.keys.inflight(0), 0, -1) == [raw]  # no outcome: left for recovery


async def test_a_system_exit_of_a_sync_handler_dead_letters_the_job_at_once(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    def leave(payload: Any, call: Call) -> None:
        raise SystemExit(3)

    handler = Handler(name="leave", spec="leave", fn=leave, is_async=False)
    rig = await make_rig(ar, r, pool, {"leave": handler}, max_attempts=3)
    env = make_envelope(1)
    await rig.runner.run(await rig.take(env), rig.lease.epoch)
    assert (
        rig.result(env.id)["error"]
        == "attempt 1 of 3 failed for good: handler raised SystemExit: 3"
    )
    assert rig.failures("permanent") == 1.0
    assert rig.count("retried") == 0.0
