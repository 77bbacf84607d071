"""THROTTLE and SIGNALS (layout.py) against a real redis-server: the job goes back
to the head with its new envelope, a pause is set and never shortened, the
effective concurrency steps down by one per 429 without Retry-After and climbs
back in growing steps once the probe interval passes without one."""

from __future__ import annotations

import time

import redis

from apipool.layout import PoolKeys
from apipool.protocol import FinishCode, PoolProtocol
from apipool.stats import write_pool_config

PROBE_MS = 2000


def now_ms() -> int:
    return int(time.time() * 1000)


def throttle(
    r: redis.Redis, proto: PoolProtocol, raw: bytes, *, pause_ms: int = 0, at: int | None = None
) -> tuple[FinishCode, int, int]:
    at = now_ms() if at is None else at
    step = proto.throttle(
        0, raw, raw.decode() + " again", pause_ms=pause_ms, pause_until=at / 1000 + pause_ms / 1000,
        adapt=True, now_ms=at,
    )  # fmt: skip
    answer = step.run(r)
    return answer.code, answer.signals.effective, answer.signals.pause_ms


def test_a_throttled_job_goes_back_to_the_head(r: redis.Redis, pool: str) -> None:
    proto, keys = PoolProtocol(pool), PoolKeys(pool)
    write_pool_config(r, pool, slots=4)
    r.lpush(keys.queue, b"later")  # the queue is taken from the right: RPUSH = next
    r.lpush(keys.inflight(0), b"job")
    assert throttle(r, proto, b"job")[0] == FinishCode.DONE
    assert r.lrange(keys.queue, 0, -1) == [b"later", b"job again"]
    assert r.llen(keys.inflight(0)) == 0
    assert r.hget(keys.stats, "throttled") == b"1"
    # Not ours (any more): nothing changes.
    assert throttle(r, proto, b"job")[0] == FinishCode.GONE
    assert r.llen(keys.queue) == 2
    assert r.hget(keys.stats, "throttled") == b"1"


def test_a_pause_is_set_and_never_shortened(r: redis.Redis, pool: str) -> None:
    proto, keys = PoolProtocol(pool), PoolKeys(pool)
    write_pool_config(r, pool, slots=4)
    for raw in (b"a", b"b"):
        r.lpush(keys.inflight(0), raw)
    _, effective, left = throttle(r, proto, b"a", pause_ms=5000)
    assert effective == 4  # a Retry-After pauses; it does not adapt
    assert 4000 < left <= 5000
    _, _, left = throttle(r, proto, b"b", pause_ms=1000)
    assert left > 4000
    until = float(r.get(keys.pause) or 0)
    assert until > time.time() + 3.5


def test_effective_steps_down_per_429_and_back_up_in_growing_steps(
    r: redis.Redis, pool: str
) -> None:
    proto, keys = PoolProtocol(pool), PoolKeys(pool)
    write_pool_config(r, pool, slots=8)
    t = now_ms()
    for k in range(5):
        r.lpush(keys.inflight(0), b"j%d" % k)
        assert throttle(r, proto, b"j%d" % k, at=t)[1] == 7 - k
    assert r.get(keys.effective) == b"3"

    def signals(at: int) -> int:
        return proto.signals(adapt=True, probe_ms=PROBE_MS, now_ms=at).run(r).effective

    assert signals(t + PROBE_MS - 1) == 3  # not yet
    assert signals(t + PROBE_MS) == 4  # +1: up to the level last refused, no further
    assert signals(t + PROBE_MS + 10) == 4
    assert signals(t + 2 * PROBE_MS) == 5  # it held there: on by one
    assert signals(t + 3 * PROBE_MS) == 7  # +2
    assert signals(t + 4 * PROBE_MS) == 8  # +4, capped at N: back to N
    assert r.exists(keys.effective, keys.adapt) == 0
    # A 429 while climbing: one down, and the step starts again at 1.
    r.lpush(keys.inflight(0), b"x")
    assert throttle(r, proto, b"x", at=t + 5 * PROBE_MS)[1] == 7
    assert signals(t + 6 * PROBE_MS) == 8


def test_a_steady_lower_limit_costs_one_refusal_per_probe(r: redis.Redis, pool: str) -> None:
    """At a limit of 4 (N = 8), the probe goes to 5, is refused, and E is back at
    4: never a jump past the level last refused."""
    proto, keys = PoolProtocol(pool), PoolKeys(pool)
    write_pool_config(r, pool, slots=8)
    t = now_ms()
    r.set(keys.effective, 4)
    seen = []
    for k in range(6):
        at = t + (k + 1) * PROBE_MS
        level = proto.signals(adapt=True, probe_ms=PROBE_MS, now_ms=at).run(r).effective
        seen.append(level)
        if level > 4:  # the API refuses the fifth call in flight
            r.lpush(keys.inflight(0), b"p%d" % k)
            assert throttle(r, proto, b"p%d" % k, at=at)[1] == 4
    assert seen == [5, 5, 5, 5, 5, 5]


def test_never_below_one_and_never_above_n(r: redis.Redis, pool: str) -> None:
    proto, keys = PoolProtocol(pool), PoolKeys(pool)
    write_pool_config(r, pool, slots=2)
    for k in range(4):
        r.lpush(keys.inflight(0), b"j%d" % k)
        throttle(r, proto, b"j%d" % k)
    assert r.get(keys.effective) == b"1"
    r.set(keys.effective, 9)  # N lowered meanwhile (scale-down)
    answer = proto.signals(adapt=True, probe_ms=PROBE_MS, now_ms=now_ms()).run(r)
    assert answer.effective == 2
    assert r.exists(keys.effective) == 0


def test_without_adaptation_effective_is_n(r: redis.Redis, pool: str) -> None:
    proto, keys = PoolProtocol(pool), PoolKeys(pool)
    write_pool_config(r, pool, slots=4)
    r.set(keys.effective, 2)
    answer = proto.signals(adapt=False, probe_ms=PROBE_MS, now_ms=now_ms()).run(r)
    assert (answer.effective, answer.slots) == (4, 4)
    r.lpush(keys.inflight(0), b"j")
    step = proto.throttle(
        0, b"j", "j", pause_ms=0, pause_until=time.time(), adapt=False, now_ms=now_ms()
    )
    assert step.run(r).signals.effective == 4  # adaptation off: N
    assert r.get(keys.effective) == b"2"  # left as it was, not lowered


def test_a_pool_without_config_parks_nobody(r: redis.Redis, pool: str) -> None:
    proto, keys = PoolProtocol(pool), PoolKeys(pool)
    r.lpush(keys.inflight(0), b"j")
    assert throttle(r, proto, b"j")[1] == 0
    answer = proto.signals(adapt=True, probe_ms=PROBE_MS, now_ms=now_ms()).run(r)
    assert (answer.effective, answer.pause_ms, answer.slots) == (0, 0, 0)
