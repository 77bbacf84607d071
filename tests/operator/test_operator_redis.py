"""The operator and a pool's Redis: stats in the status, N published, jobs of
removed slots returned (or dead-lettered) once their pods are gone, and a
Redis that may evict keys reported."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import redis

from apipool import Client
from apipool.envelope import make_envelope, parse_envelope
from apipool.layout import PoolKeys
from apipool.testing.redis_server import RedisServer

from .conftest import TIMER_INTERVAL, Cluster, OperatorThread, wait_for

pytestmark = [pytest.mark.operator, pytest.mark.redis]


def settled(cluster: Cluster, pool: str, slots: int) -> bool:
    return (
        cluster.slots_are(pool, range(slots))
        and cluster.condition(pool, "Ready").get("status") == "True"
        and cluster.status(pool).get("desiredSlots") == slots
    )


def condition_is(cluster: Cluster, pool: str, kind: str, status: str, reason: str) -> bool:
    cond = cluster.condition(pool, kind)
    return (cond.get("status"), cond.get("reason")) == (status, reason)


def texts(values: list[Any]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


@pytest.mark.timeout(20)
def test_the_status_shows_the_pools_redis(
    cluster: Cluster, operator: OperatorThread, r: redis.Redis
) -> None:
    pool = cluster.new_name()
    keys = PoolKeys(pool)
    cluster.create_pool(pool, slots=3)
    wait_for(lambda: settled(cluster, pool, 3), 5, what="3 ready slots")
    assert r.hgetall(keys.config) == {b"slots": b"3", b"max_queue_length": b"0"}
    status = cluster.status(pool)
    assert (status["queueDepth"], status["busySlots"], status["deadLetters"]) == (0, 0, 0)
    assert status["utilization"] == 0.0

    with Client(cluster.redis_url, pool) as client:
        client.submit_many([{"n": i} for i in range(4)])
    busy = make_envelope({"n": "in the works"})
    r.lpush(keys.inflight(0), busy.to_json())  # what slot 0 does while it calls the API
    r.lpush(keys.dead, json.dumps({"id": "x", "reason": "test", "envelope": "{}"}))

    def shows_it() -> bool:
        s = cluster.status(pool)
        return (s.get("queueDepth"), s.get("busySlots"), s.get("deadLetters")) == (4, 1, 1)

    wait_for(shows_it, 2 * TIMER_INTERVAL + 3, what="the Redis stats in the status")
    status = cluster.status(pool)
    assert status["inFlight"] == 1
    assert status["utilization"] == round(1 / 3, 4)
    # Slot 0 has a pod: its job is its own, not the reaper's.
    assert texts(r.lrange(keys.inflight(0), 0, -1)) == [busy.to_json()]

    # N and the queue bound follow the spec.
    cluster.patch_spec(pool, slots=2, maxQueueLength=50)
    wait_for(
        lambda: r.hgetall(keys.config) == {b"slots": b"2", b"max_queue_length": b"50"},
        5,
        what="the pool config in Redis",
    )
    wait_for(lambda: settled(cluster, pool, 2), 5, what="2 ready slots")
    wait_for(
        lambda: cluster.status(pool).get("utilization") == 0.5, 2 * TIMER_INTERVAL + 3, what="1/2"
    )


@pytest.mark.timeout(30)
@pytest.mark.emulator(pod_grace=None)
def test_jobs_of_removed_slots_return_once_their_pods_are_gone(
    cluster: Cluster, kube: Any, operator: OperatorThread, r: redis.Redis
) -> None:
    pool = cluster.new_name()
    keys = PoolKeys(pool)
    cluster.create_pool(pool, slots=3, maxAttempts=3)
    wait_for(lambda: settled(cluster, pool, 3), 5, what="3 ready slots")

    stranded = make_envelope({"job": "stranded"})
    last_try = dataclasses.replace(make_envelope({"job": "last try"}), attempt=3)
    r.lpush(keys.inflight(2), stranded.to_json())
    r.lpush(keys.inflight(1), last_try.to_json())

    cluster.scale(pool, 1)
    terminating = [f"{pool}-slot-1", f"{pool}-slot-2"]
    wait_for(
        lambda: cluster.pod_names(pool, terminating=True) == terminating, 5, what="Terminating"
    )
    wait_for(lambda: r.hget(keys.config, "slots") == b"1", 3, what="N=1 in Redis")
    # While their pods exist, the slots may still finish their calls: nothing is reaped.
    cluster.wait_reconciles(pool, count=2, timeout=2 * TIMER_INTERVAL + 3)
    assert texts(r.lrange(keys.inflight(2), 0, -1)) == [stranded.to_json()]
    assert texts(r.lrange(keys.inflight(1), 0, -1)) == [last_try.to_json()]
    assert r.llen(keys.queue) == 0

    # Slot 2's pod is gone: its job goes back to the front of the queue, attempt + 1.
    assert kube.finish_deletion(f"{pool}-slot-2")
    wait_for(lambda: r.llen(keys.inflight(2)) == 0, 3, what="slot 2 reaped")
    (raw,) = r.lrange(keys.queue, 0, -1)
    back = parse_envelope(raw)
    assert (back.id, back.payload, back.attempt) == (stranded.id, {"job": "stranded"}, 2)
    assert r.hget(keys.stats, "recovered") == b"1"
    # Slot 1 still terminates: its job stays where it is.
    assert texts(r.lrange(keys.inflight(1), 0, -1)) == [last_try.to_json()]

    # Slot 1's job was on its last attempt: it is dead-lettered, with a result.
    assert kube.finish_deletion(f"{pool}-slot-1")
    wait_for(lambda: r.llen(keys.inflight(1)) == 0, 3, what="slot 1 reaped")
    (entry,) = r.lrange(keys.dead, 0, -1)
    dead = json.loads(entry)
    assert dead["id"] == last_try.id
    assert dead["reason"] == "slot removed during attempt 3 of 3"
    (record,) = r.lrange(keys.result(last_try.id), 0, -1)
    assert json.loads(record)["status"] == "dead"
    assert r.llen(keys.queue) == 1

    def counted() -> bool:
        s = cluster.status(pool)
        return (s.get("queueDepth"), s.get("deadLetters"), s.get("desiredSlots")) == (1, 1, 1)

    wait_for(counted, 2 * TIMER_INTERVAL + 3, what="the status to count them")
    assert cluster.slots_are(pool, range(1))


@pytest.mark.timeout(60)
def test_a_redis_that_may_evict_keys_degrades_the_pool(
    cluster: Cluster, operator: OperatorThread
) -> None:
    """maxmemory with an evicting policy: Degraded (RedisMayEvict) and one Event,
    the slots left as they are; cleared by noeviction or by allowRedisEviction."""
    with RedisServer() as server, redis.Redis.from_url(server.url, socket_timeout=5) as own:
        own.config_set("maxmemory", "100mb")
        own.config_set("maxmemory-policy", "allkeys-lru")
        cluster.put_secret("evicting", {"url": server.url})
        pool = cluster.new_name()
        keys = PoolKeys(pool)
        cluster.create_pool(pool, slots=2, redis={"secretRef": {"name": "evicting", "key": "url"}})
        wait_for(
            lambda: condition_is(cluster, pool, "Degraded", "True", "RedisMayEvict"),
            5,
            what="Degraded: RedisMayEvict",
        )
        message = cluster.condition(pool, "Degraded")["message"]
        assert f"Redis of pool {pool} may evict keys" in message
        assert "maxmemory is 104857600 bytes with maxmemory-policy allkeys-lru" in message
        assert "noeviction" in message
        assert "spec.allowRedisEviction" in message
        assert condition_is(cluster, pool, "Ready", "False", "RedisMayEvict")
        wait_for(lambda: cluster.events(pool, reason="RedisMayEvict"), 3, what="an Event")
        (event,) = cluster.events(pool, reason="RedisMayEvict")
        assert (event["type"], event["message"]) == ("Warning", message)
        # The slots are left as they are, and the Redis bookkeeping goes on.
        assert cluster.slots_are(pool, range(2))
        assert own.hget(keys.config, "slots") == b"2"
        assert cluster.status(pool).get("queueDepth") == 0
        cluster.wait_reconciles(pool, count=2, timeout=3 * TIMER_INTERVAL + 3)
        assert len(cluster.events(pool, reason="RedisMayEvict")) == 1  # not one per reconcile
        assert cluster.slots_are(pool, range(2))

        # noeviction (with maxmemory still set): the condition clears.
        own.config_set("maxmemory-policy", "noeviction")
        wait_for(lambda: settled(cluster, pool, 2), 3 * TIMER_INTERVAL + 5, what="Ready again")
        assert condition_is(cluster, pool, "Degraded", "False", "AsExpected")

        # An evicting policy again, then the pool accepts the risk: no condition.
        own.config_set("maxmemory-policy", "volatile-ttl")
        wait_for(
            lambda: "volatile-ttl" in cluster.condition(pool, "Degraded").get("message", ""),
            3 * TIMER_INTERVAL + 5,
            what="Degraded again",
        )
        assert len(cluster.events(pool, reason="RedisMayEvict")) == 2  # a new problem
        cluster.patch_spec(pool, allowRedisEviction=True)

        def told() -> bool:
            """Degraded no more, and every slot replaced by one running with the flag."""
            pods = cluster.pods(pool).values()
            return (
                settled(cluster, pool, 2)
                and condition_is(cluster, pool, "Degraded", "False", "AsExpected")
                and all("--allow-eviction" in p["spec"]["containers"][0]["args"] for p in pods)
            )

        wait_for(told, 3 * TIMER_INTERVAL + 5, what="the risk accepted")
