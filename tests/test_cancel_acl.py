"""CANCEL, the unread set and SWEEP under the ACL users of docs/operations.md: a
producer cancels and reads (taking results off the unread set), a slot adds to
it and sweeps it, with no denial; without ``+zrem`` a read still works."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest

from apipool.client import Client
from apipool.layout import PoolKeys
from apipool.protocol import PoolProtocol
from apipool.stats import write_pool_config

from .conftest import SlotProcess, wait_for
from .test_redis_acl import AclUsers, acl, admin, base_lines, redis_url  # noqa: F401

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

StartSlot = Callable[..., SlotProcess]


def test_cancel_read_and_sweep_work_as_the_doc_users(
    acl: AclUsers,  # noqa: F811
    start_slot: StartSlot,
    pool: str,
) -> None:
    keys = PoolKeys(pool)
    write_pool_config(acl.client("operator"), pool, slots=1)
    with Client(acl.url("producer"), pool) as producer:
        queued = producer.submit_many([{"n": n} for n in range(3)])
        assert producer.cancel(queued[0]) is True  # by its envelope
        with Client(acl.url("producer"), pool) as other:
            assert other.cancel(queued[1]) is True  # by the scan
        slot = start_slot(extra=("--result-ttl", "1"))
        wait_for(lambda: slot.status("/readyz") == 200, 15, what="slot ready")
        assert producer.wait(queued[2], 10).status == "ok"
        unread = producer.submit({"n": 9})
        wait_for(lambda: acl.admin.exists(keys.result(unread)), 10, what="the unread result")
    assert acl.admin.zrange(keys.unread, 0, -1) == [unread.encode()]
    time.sleep(1.2)  # the result expired (its TTL is 1 s)
    # The slot user sweeps now, as the slot does every 10 s (its guard cleared; the
    # slot's own sweep may get there first: then this one counts nothing).
    proto, as_slot = PoolProtocol(pool), acl.client("slot")

    def sweep() -> bool:
        acl.admin.delete(keys.sweep)
        return proto.sweep(now_ms=int(time.time() * 1000)).run(as_slot) >= 0

    wait_for(sweep, 10, what="a sweep as the slot user")
    assert acl.admin.hget(keys.stats, "expired_unread") == b"1"
    assert acl.admin.zcard(keys.unread) == 0
    assert acl.admin.hget(keys.stats, "cancelled") == b"2"
    assert acl.denials() == []


def test_a_read_without_zrem_still_returns_the_result(
    acl: AclUsers,  # noqa: F811
    start_slot: StartSlot,
    pool: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    acl.apply(base_lines()["producer"], without=("+zrem",))
    slot = start_slot()
    wait_for(lambda: slot.status("/readyz") == 200, 15, what="slot ready")
    with Client(acl.url("producer"), pool) as producer, caplog.at_level(logging.WARNING):
        assert producer.call({"n": 1}, timeout=10)["echo"] == {"n": 1}
        assert producer.call({"n": 2}, timeout=10)["echo"] == {"n": 2}
    warnings = [r for r in caplog.records if "expired unread" in r.getMessage()]
    assert len(warnings) == 1  # said once per client, not per read
    assert acl.admin.zcard(PoolKeys(pool).unread) == 2  # they will be counted unread
