"""The operator's Redis steps on their own, against real redis-servers: whether
Redis may evict keys, and the reaping of removed slots within the pool's limits."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from apipool.envelope import make_envelope
from apipool.operator import redis_ops
from apipool.operator.spec import PoolSpec, parse_spec
from apipool.testing.redis_server import RedisServer

pytestmark = pytest.mark.redis


def pool_spec(**changes: Any) -> PoolSpec:
    base = {"slots": 1, "image": "apipool:dev", "redis": {"secretRef": {"name": "redis"}}}
    return parse_spec("billing", {**base, **changes})


@pytest.mark.parametrize(
    ("memory", "risk"),
    [
        ({"maxmemory": 0, "maxmemory_policy": "allkeys-lru"}, None),
        ({"maxmemory": 1 << 20, "maxmemory_policy": "noeviction"}, None),
        ({}, None),
        (
            {"maxmemory": 1 << 20, "maxmemory_policy": "volatile-lru"},
            "maxmemory is 1048576 bytes with maxmemory-policy volatile-lru",
        ),
        (
            {"maxmemory": 5, "maxmemory_policy": "allkeys-random"},
            "maxmemory is 5 bytes with maxmemory-policy allkeys-random",
        ),
        ({"maxmemory": 5}, "maxmemory is 5 bytes with maxmemory-policy unknown"),
        (
            {"maxmemory": "lots", "maxmemory_policy": "allkeys-lru"},
            "maxmemory is unreadable with maxmemory-policy allkeys-lru",
        ),
    ],
)
def test_eviction_risk_reads_info_memory(memory: dict[str, Any], risk: str | None) -> None:
    assert redis_ops.eviction_risk(memory) == risk


@pytest.fixture
def own_redis() -> Iterator[redis.Redis]:
    """A redis-server of this test's own: its configuration is changed."""
    with RedisServer() as server, redis.Redis.from_url(server.url, socket_timeout=5) as client:
        yield client


@pytest.mark.timeout(20)
def test_read_eviction_risk_follows_the_servers_configuration(own_redis: redis.Redis) -> None:
    assert redis_ops.read_eviction_risk(own_redis) is None  # no maxmemory by default
    own_redis.config_set("maxmemory-policy", "allkeys-lru")
    assert redis_ops.read_eviction_risk(own_redis) is None  # a policy alone evicts nothing
    own_redis.config_set("maxmemory", "100mb")
    risk = redis_ops.read_eviction_risk(own_redis)
    assert risk == "maxmemory is 104857600 bytes with maxmemory-policy allkeys-lru"
    own_redis.config_set("maxmemory-policy", "noeviction")
    assert redis_ops.read_eviction_risk(own_redis) is None


@pytest.mark.timeout(20)
def test_reaping_keeps_the_pools_limits(r: redis.Redis, pool: str) -> None:
    """The jobs of removed slots: an envelope over the pool's size limit is
    dead-lettered unread, and the dead-letter list is trimmed to the pool's cap."""
    spec = pool_spec(maxEnvelopeBytes=512, maxDeadLetters=2, maxAttempts=2)
    proto = redis_ops.pool_protocol(pool, spec)
    assert (proto.max_envelope_bytes, proto.max_dead_letters) == (512, 2)
    keys = proto.keys
    good = make_envelope({"n": 1})
    big = make_envelope({"blob": "x" * 600})
    assert len(good.to_json()) < 512 < len(big.to_json())
    r.rpush(keys.inflight(3), good.to_json(), big.to_json())
    spent = [dataclasses.replace(make_envelope({"n": i}), attempt=2) for i in range(3)]
    r.rpush(keys.inflight(4), *(e.to_json() for e in spent))
    assert redis_ops.orphaned_slots(r, proto, live={0, 4}) == [3]
    assert redis_ops.orphaned_slots(r, proto, live={0}) == [3, 4]

    assert redis_ops.reap(r, proto, 3, max_attempts=2, result_ttl_seconds=60) == 2
    (back,) = r.lrange(keys.queue, 0, -1)
    assert json.loads(back)["id"] == good.id
    (entry,) = [json.loads(e) for e in r.lrange(keys.dead, 0, -1)]
    assert "over the limit of 512 bytes" in entry["reason"]
    assert entry["envelope_bytes"] == len(big.to_json().encode())
    assert entry["id"] in (None, big.id)  # unread: its id may not be known

    # Three more dead letters: the list keeps the newest two, the rest is counted.
    assert redis_ops.reap(r, proto, 4, max_attempts=2, result_ttl_seconds=60) == 3
    assert r.llen(keys.inflight(3)) == r.llen(keys.inflight(4)) == 0
    dead_ids = {json.loads(e)["id"] for e in r.lrange(keys.dead, 0, -1)}
    assert len(dead_ids) == 2
    assert dead_ids <= {e.id for e in spent}
    assert r.hget(keys.stats, "dead_trimmed") == b"2"
