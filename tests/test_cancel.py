"""Client.cancel and the CANCEL script, against a real redis-server and real slots:
a job cancelled while it waits in the queue is never called and gets no result;
a job a slot has taken is not cancellable; an unknown or hostile id removes
nothing; the scan by id stays within its bound."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from apipool.client import Client
from apipool.errors import ResultTimeout
from apipool.layout import PoolKeys
from apipool.protocol import CANCEL, CancelCode, PoolProtocol

from .conftest import ROOT, SlotProcess, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

StartSlot = Callable[..., SlotProcess]


def called(log: Path) -> list[str]:
    """The job ids the slow_down handler was called with, in order."""
    if not log.exists():
        return []
    return [line.split()[1] for line in log.read_text().splitlines()]


def recording_slot(start_slot: StartSlot, tmp_path: Path) -> Path:
    """A ready slot whose handler logs each call; the log's path."""
    slot = start_slot(handler="tests.handlers:slow_down")
    wait_for(lambda: slot.status("/readyz") == 200, 15, what="slot ready")
    return tmp_path / "calls.log"


def envelope(job_id: str, payload: object = None) -> str:
    return json.dumps({"id": job_id, "payload": payload, "submitted_at": 1, "attempt": 1})


def test_a_queued_job_cancelled_before_a_slot_takes_it_is_never_called(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    log = recording_slot(start_slot, tmp_path)
    keys = PoolKeys(pool)
    with Client(redis_url, pool) as submitter, Client(redis_url, pool) as other:
        ids = submitter.submit_many([{"log": str(log), "seconds": 0.2} for _ in range(12)])
        mine, theirs = ids[-1], ids[-2]  # the last two in line: still queued
        assert submitter.cancel(mine) is True  # by its exact envelope
        assert other.cancel(theirs) is True  # by id: ``other`` never saw the envelope
        assert submitter.cancel(mine) is False  # gone already
        for job_id in ids[:-2]:
            assert submitter.wait(job_id, 20).status == "ok"
        with pytest.raises(ResultTimeout):
            submitter.wait(mine, 0.5)  # no record is written for a cancelled job
    assert called(log) == ids[:-2]  # every other job was called once, in order
    assert r.exists(keys.result(mine), keys.result(theirs)) == 0
    assert r.llen(keys.queue) == 0
    assert r.hget(keys.stats, "cancelled") == b"2"
    assert r.hget(keys.stats, "ok") == b"10"


def test_a_job_a_slot_has_taken_is_not_cancellable(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    log = recording_slot(start_slot, tmp_path)
    keys = PoolKeys(pool)
    with Client(redis_url, pool) as client:
        job_id = client.submit({"log": str(log), "seconds": 1.5})
        wait_for(lambda: called(log) == [job_id], 10, what="the call to start")
        assert r.llen(keys.inflight(0)) == 1
        assert client.cancel(job_id) is False  # in flight: the call goes on
        assert client.wait(job_id, 10).status == "ok"
        assert client.cancel(job_id) is False  # done
    assert r.hget(keys.stats, "cancelled") is None


def test_unknown_and_hostile_ids_remove_nothing(redis_url: str, pool: str, r: redis.Redis) -> None:
    keys = PoolKeys(pool)
    proto = PoolProtocol(pool)
    queued = [
        envelope("j10"),
        envelope("other", payload={"id": "target", "note": 'j1 %s .* " \\'}),
        "not json but mentions target",
        "[" * 2000 + "]" * 2000 + " target",  # cjson refuses the depth: skipped
        envelope("x.y"),
    ]
    r.lpush(keys.queue, *queued)
    with Client(redis_url, pool) as client:
        assert client.cancel("never-submitted") is False
        for hostile in ("", "*", "%", ".*", 'x" or "1', "a" * 129, "j1\n", "ö", 7):
            assert client.cancel(hostile) is False  # type: ignore[arg-type]
    # The script itself, as another language's client may call it with anything:
    for job_id in ("j1", "target", "x", "%", ".*", "[", '"', "\\", ""):
        assert proto.cancel(job_id, scan=100).run(r) == CancelCode.ABSENT, job_id
    assert r.lrange(keys.queue, 0, -1) == [v.encode() for v in reversed(queued)]
    assert r.hget(keys.stats, "cancelled") is None
    assert proto.cancel("x.y", scan=100).run(r) == CancelCode.REMOVED  # a dot is a dot
    assert r.llen(keys.queue) == len(queued) - 1


def test_the_scan_by_id_stays_within_its_bound(redis_url: str, pool: str, r: redis.Redis) -> None:
    keys = PoolKeys(pool)
    proto = PoolProtocol(pool)
    with Client(redis_url, pool) as client:
        ids = client.submit_many(list(range(50)))  # ids[0] is next in line, ids[-1] last
        # Another process: only the 10 envelopes next in line are read.
        assert proto.cancel(ids[-1], scan=10).run(r) == CancelCode.BEYOND_SCAN
        assert proto.cancel(ids[5], scan=10).run(r) == CancelCode.REMOVED
        assert proto.cancel(ids[-1], scan=0).run(r) == CancelCode.BEYOND_SCAN
        # The client that submitted it knows the envelope: found anywhere, no scan.
        assert client.cancel(ids[-1], scan=0) is True
    assert r.llen(keys.queue) == 48
    assert r.hget(keys.stats, "cancelled") == b"2"


def test_the_envelopes_a_client_remembers_are_bounded(
    redis_url: str, pool: str, r: redis.Redis
) -> None:
    with Client(redis_url, pool, remember_jobs=3) as client:
        ids = [client.submit(n) for n in range(5)]
        assert client.cancel(ids[0], scan=0) is False  # forgotten: only the newest 3 kept
        assert client.cancel(ids[0]) is True  # found by the scan all the same
        assert all(client.cancel(job_id, scan=0) for job_id in ids[2:])
    with Client(redis_url, pool, remember_bytes=10) as client:
        job_id = client.submit("an envelope over 10 bytes")
        assert client.cancel(job_id, scan=0) is False
    assert r.llen(PoolKeys(pool).queue) == 2


def test_the_wire_format_doc_carries_the_cancel_script_verbatim() -> None:
    text = (ROOT / "docs" / "wire-format.md").read_text(encoding="utf-8")
    section = text.split("\n### Cancelling a queued job\n", 1)[1]
    found = re.search(r"```lua\n(.*?)\n```", section, re.DOTALL)
    assert found, "the CANCEL script is gone from docs/wire-format.md"
    assert found.group(1).strip() == CANCEL.source.strip()
