"""The Lease: arithmetic on a fake clock (no Redis), then the real scripts on a real redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from apipool.lease import Lease
from apipool.protocol import ACQUIRE, RELEASE, RENEW, LeaseCode, PoolProtocol
from apipool.stats import write_pool_config
from apipool.testing.clock import FakeClock

TTL = 5.0


class ScriptedRedis:
    """Answers each script call with the next scripted reply (an exception is
    raised instead); each reply takes ``delay`` seconds on the fake clock."""

    def __init__(
        self, clock: FakeClock, replies: list[Any], *, delay: float = 0.0, slots: int | None = None
    ) -> None:
        self.clock = clock
        self.replies = list(replies)
        self.delay = delay
        self.slots = slots
        self.scripts: list[str] = []

    async def evalsha(self, sha: str, numkeys: int, *args: Any) -> Any:
        self.scripts.append(sha)
        self.clock.advance(self.delay)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def hget(self, key: str, field: str) -> bytes | None:
        return None if self.slots is None else str(self.slots).encode()

    def client(self) -> aioredis.Redis:
        return cast(aioredis.Redis, self)


def acquired(code: LeaseCode = LeaseCode.ACQUIRED, holder: bytes = b"me/1") -> list[Any]:
    return [int(code), holder, int(TTL * 1000)]


def make_lease(clock: FakeClock, slot: int = 0, owner: str = "me") -> Lease:
    return Lease(PoolProtocol("p"), slot, owner, TTL, clock=clock, incarnation="1")


# -- arithmetic on a fake clock ---------------------------------------------------------


@pytest.mark.unit
def test_token_is_owner_and_incarnation_and_ttl_must_be_positive() -> None:
    lease = make_lease(FakeClock())
    assert lease.token == "me/1"
    assert Lease(PoolProtocol("p"), 0, "pod", TTL).token.startswith("pod/")
    with pytest.raises(ValueError, match="ttl must be > 0"):
        Lease(PoolProtocol("p"), 0, "me", 0)


@pytest.mark.unit
def test_a_lease_never_acquired_is_valid_for_nothing() -> None:
    lease = make_lease(FakeClock())
    assert not lease.held
    assert lease.epoch == 0
    assert lease.remaining() == 0.0
    assert not lease.valid_for(0)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_validity_counts_from_when_the_acquire_was_sent() -> None:
    clock = FakeClock()
    fake = ScriptedRedis(clock, [acquired()], delay=0.7)  # a slow reply
    lease = make_lease(clock)
    answer = await lease.acquire(fake.client())
    assert answer.code == LeaseCode.ACQUIRED
    assert fake.scripts == [ACQUIRE.sha]
    assert lease.held
    assert lease.remaining() == pytest.approx(TTL - 0.7)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_validity_counts_from_when_the_renew_was_sent() -> None:
    clock = FakeClock()
    fake = ScriptedRedis(clock, [acquired(), 1])
    lease = make_lease(clock)
    await lease.acquire(fake.client())
    clock.advance(2.0)
    fake.delay = 1.5  # the renewal's reply comes late
    assert await lease.renew(fake.client())
    assert fake.scripts[-1] == RENEW.sha
    assert lease.remaining() == pytest.approx(TTL - 1.5)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_valid_for_is_strict_at_the_boundary_and_runs_out_with_the_clock() -> None:
    clock = FakeClock()
    lease = make_lease(clock)
    await lease.acquire(ScriptedRedis(clock, [acquired()]).client())
    assert lease.valid_for(TTL - 0.001)
    assert not lease.valid_for(TTL)
    clock.advance(3.0)
    assert lease.valid_for(1.9)
    assert not lease.valid_for(2.0)
    clock.advance(2.0)
    assert lease.held  # nobody said otherwise, but it is worth nothing now
    assert not lease.valid_for(0)
    assert lease.remaining() == 0.0


@pytest.mark.unit
@pytest.mark.asyncio
async def test_epoch_changes_at_every_acquisition_only() -> None:
    clock = FakeClock()
    fake = ScriptedRedis(clock, [acquired(), 1, 1, acquired(LeaseCode.KEPT), 0, acquired()])
    lease = make_lease(clock)
    await lease.acquire(fake.client())
    assert lease.epoch == 1
    assert await lease.renew(fake.client())
    assert await lease.refresh(fake.client())  # held: a renewal
    assert (await lease.acquire(fake.client())).code == LeaseCode.KEPT  # held all along
    assert lease.epoch == 1
    assert not await lease.renew(fake.client())  # gone: lost
    assert not lease.held
    assert await lease.refresh(fake.client())  # not held: an acquisition
    assert lease.epoch == 2


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_refused_renewal_loses_the_lease_at_once() -> None:
    clock = FakeClock()
    lease = make_lease(clock)
    fake = ScriptedRedis(clock, [acquired(), 0])
    await lease.acquire(fake.client())
    assert not await lease.renew(fake.client())
    assert not lease.held
    assert not lease.valid_for(0)
    assert not await lease.renew(fake.client())  # nothing to renew: no script run
    assert fake.scripts == [ACQUIRE.sha, RENEW.sha]


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_failed_renewal_does_not_extend_the_lease() -> None:
    clock = FakeClock()
    lease = make_lease(clock)
    fake = ScriptedRedis(clock, [acquired(), RedisConnectionError("down")])
    await lease.acquire(fake.client())
    clock.advance(2.0)
    with pytest.raises(RedisConnectionError):
        await lease.renew(fake.client())
    assert lease.held
    assert lease.remaining() == pytest.approx(TTL - 2.0)


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_refused_acquisition_reports_the_holder() -> None:
    clock = FakeClock()
    lease = make_lease(clock)
    fake = ScriptedRedis(clock, [[0, b"other/9", 1234]])
    answer = await lease.acquire(fake.client())
    assert (answer.code, answer.holder, answer.pttl_ms) == (LeaseCode.REFUSED, "other/9", 1234)
    assert not answer.held
    assert not lease.held
    assert lease.epoch == 0


@pytest.mark.unit
@pytest.mark.asyncio
async def test_release_drops_the_lease_here_even_when_redis_fails() -> None:
    clock = FakeClock()
    lease = make_lease(clock)
    fake = ScriptedRedis(clock, [acquired(), RedisConnectionError("down")])
    await lease.acquire(fake.client())
    with pytest.raises(RedisConnectionError):
        await lease.release(fake.client())
    assert fake.scripts == [ACQUIRE.sha, RELEASE.sha]
    assert not lease.held
    assert not await lease.release(fake.client())  # not held: nothing sent


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_slot_beyond_the_published_size_is_valid_for_nothing() -> None:
    clock = FakeClock()
    lease = make_lease(clock, slot=2)
    fake = ScriptedRedis(clock, [acquired()], slots=2)
    await lease.acquire(fake.client())
    assert await lease.check_pool_size(fake.client())
    assert lease.surplus
    assert lease.held
    assert not lease.valid_for(0)
    fake.slots = 3  # scaled up: slot 2 exists again
    assert not await lease.check_pool_size(fake.client())
    assert lease.valid_for(1.0)
    fake.slots = None  # no size published: not surplus
    assert not await lease.check_pool_size(fake.client())


# -- the scripts on a real redis ---------------------------------------------------------


@pytest_asyncio.fixture
async def ar(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    await client.aclose()


def real_lease(pool: str, owner: str, incarnation: str, slot: int = 0) -> Lease:
    return Lease(PoolProtocol(pool), slot, owner, TTL, incarnation=incarnation)


@pytest.mark.redis
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_acquire_renew_release_on_redis(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    key = PoolProtocol(pool).keys.lease(0)
    lease = real_lease(pool, "pod-a", "1")
    assert (await lease.acquire(ar)).code == LeaseCode.ACQUIRED
    assert r.get(key) == b"pod-a/1"
    assert 4000 < r.pttl(key) <= 5000
    r.pexpire(key, 500)
    assert await lease.renew(ar)
    assert r.pttl(key) > 4000
    assert await lease.release(ar)
    assert r.exists(key) == 0


@pytest.mark.redis
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_the_same_owner_takes_over_a_dead_predecessors_lease_at_once(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    key = PoolProtocol(pool).keys.lease(0)
    r.set(key, b"pod-a/dead", px=60_000)
    lease = real_lease(pool, "pod-a", "new")
    answer = await lease.acquire(ar)
    assert (answer.code, answer.holder) == (LeaseCode.TAKEN_OVER, "pod-a/dead")
    assert lease.epoch == 1
    assert r.get(key) == b"pod-a/new"


@pytest.mark.redis
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_another_owner_is_refused_and_changes_nothing(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    key = PoolProtocol(pool).keys.lease(0)
    holder = real_lease(pool, "pod-a", "1")
    await holder.acquire(ar)
    intruder = real_lease(pool, "pod-ab", "2")  # shares a prefix, not the owner
    answer = await intruder.acquire(ar)
    assert answer.code == LeaseCode.REFUSED
    assert answer.holder == "pod-a/1"
    assert 0 < answer.pttl_ms <= 5000
    assert not intruder.held
    assert not await intruder.release(ar)
    assert r.get(key) == b"pod-a/1"


@pytest.mark.redis
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_a_lease_taken_by_someone_else_is_lost_at_renewal_and_not_released(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    key = PoolProtocol(pool).keys.lease(0)
    lease = real_lease(pool, "pod-a", "1")
    await lease.acquire(ar)
    r.set(key, b"pod-b/7", px=60_000)
    assert not await lease.renew(ar)
    assert not lease.held
    assert not await lease.release(ar)
    assert r.get(key) == b"pod-b/7"  # theirs, untouched


@pytest.mark.redis
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_release_leaves_a_lease_that_changed_hands(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    key = PoolProtocol(pool).keys.lease(0)
    lease = real_lease(pool, "pod-a", "1")
    await lease.acquire(ar)
    r.set(key, b"pod-c/3", px=60_000)
    assert not await lease.release(ar)  # ran, but the lease was not ours any more
    assert not lease.held
    assert r.get(key) == b"pod-c/3"


@pytest.mark.redis
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_surplus_follows_the_size_the_pool_publishes(
    ar: aioredis.Redis, r: redis.Redis, pool: str
) -> None:
    lease = real_lease(pool, "pod-a", "1", slot=1)
    await lease.acquire(ar)
    assert not await lease.check_pool_size(ar)  # nothing published yet
    write_pool_config(r, pool, slots=1)
    assert await lease.check_pool_size(ar)
    assert not lease.valid_for(0)
    write_pool_config(r, pool, slots=2)
    assert not await lease.check_pool_size(ar)
    assert lease.valid_for(0)
