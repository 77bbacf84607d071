"""A Client is fork-safe: one made (and used) before ``os.fork()``, as an RQ
worker or Celery's prefork parent makes it, serves the child and the parent at
once, each on connections of its own."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

from apipool.client import Client

from .conftest import SlotProcess, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def test_a_client_made_before_fork_serves_the_child_and_the_parent(
    start_slot: Callable[..., SlotProcess], redis_url: str, pool: str
) -> None:
    slot = start_slot()
    wait_for(lambda: slot.status("/readyz") == 200, 15, what="slot ready")
    client = Client(redis_url, pool)
    assert client.call({"n": 0}, timeout=10)["echo"] == {"n": 0}  # a connection is open
    before = client._redis.client_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        code = 1
        try:
            os.close(read)
            ids = client.submit_many([{"n": n, "in": "child"} for n in range(1, 4)])
            report = {
                "echoes": [client.result(i, timeout=10)["echo"] for i in ids],
                "client_id": client._redis.client_id(),
            }
            os.write(write, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    echoes = [client.call({"n": n, "in": "parent"}, timeout=10)["echo"] for n in range(1, 4)]
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        child = json.loads(pipe.read() or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0, child
    assert echoes == [{"n": n, "in": "parent"} for n in range(1, 4)]
    assert child["echoes"] == [{"n": n, "in": "child"} for n in range(1, 4)]
    # Never the parent's socket: redis-py opened the child's own connection.
    assert child["client_id"] != before
    assert client._redis.client_id() == before  # the parent's is still its own
    client.close()
