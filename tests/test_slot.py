"""A real slot process against a real redis-server: results, retries, dead letters, leases."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

import pytest
import redis

from apipool import Client, EnvelopeError, JobExpired, JobFailed, QueueFull, ResultTimeout
from apipool.envelope import make_envelope
from apipool.exitcodes import ExitCode
from apipool.layout import PoolKeys
from apipool.stats import read_stats, write_pool_config

from .conftest import SlotProcess, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

StartSlot = Callable[..., SlotProcess]


def ready(slot: SlotProcess) -> None:
    wait_for(lambda: slot.status("/readyz") == 200, 15, what="slot ready")


def dead_letters(r: redis.Redis, pool: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in r.lrange(PoolKeys(pool).dead, 0, -1)]


def test_job_result_is_delivered_and_stays_readable(
    start_slot: StartSlot, redis_url: str, pool: str
) -> None:
    slot = start_slot()
    ready(slot)
    with Client(redis_url, pool) as client:
        job_id = client.submit({"q": 1})
        first = client.wait(job_id, 10)
        second = client.wait(job_id, 1)
    assert first.status == "ok"
    assert first.result == {"echo": {"q": 1}, "job": job_id, "attempt": 1, "slot": 0}
    assert second == first


def test_call_submits_and_waits(start_slot: StartSlot, redis_url: str, pool: str) -> None:
    ready(start_slot())
    with Client(redis_url, pool) as client:
        results = [client.call({"n": n}, timeout=10) for n in range(5)]
    assert [res["echo"]["n"] for res in results] == list(range(5))


def test_submit_many_is_pipelined_and_fifo(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    with Client(redis_url, pool) as client:
        ids = client.submit_many([{"n": n} for n in range(50)])
        assert r.llen(PoolKeys(pool).queue) == 50
        ready(start_slot())
        finished = [client.wait(job_id, 20) for job_id in ids]
    assert [f.result["echo"]["n"] for f in finished] == list(range(50))
    assert read_stats(r, pool, slots=1).counters["ok"] == 50


def test_failed_attempt_is_retried_with_the_next_attempt_number(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    ready(start_slot(handler="tests.handlers:fail_first"))
    with Client(redis_url, pool) as client:
        assert client.call({}, timeout=10) == {"attempt": 2}
    assert read_stats(r, pool, slots=1).counters["retried"] == 1


def test_handler_that_always_raises_is_dead_lettered_and_the_pool_goes_on(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    ready(start_slot(handler="tests.handlers:always_raise", extra=("--max-attempts", "3")))
    with Client(redis_url, pool) as client:
        job_id = client.submit({"x": 1})
        with pytest.raises(JobFailed) as failure:
            client.result(job_id, timeout=10)
        assert "attempt 3 of 3 failed" in failure.value.reason
        assert "RuntimeError: the API said no" in failure.value.reason
        entries = dead_letters(r, pool)
        assert [e["id"] for e in entries] == [job_id]
        assert entries[0]["attempt"] == 3
        # still working: the next jobs are answered too
        others = client.submit_many([{"y": n} for n in range(3)])
        for other in others:
            with pytest.raises(JobFailed):
                client.result(other, timeout=10)
    assert len(dead_letters(r, pool)) == 4


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"this is not json", "not valid JSON"),
        (b"[1, 2, 3]", "must be a JSON object"),
        (b'{"id": "abc", "payload": 1}', "lacks required field(s): submitted_at, attempt"),
        (
            b'{"id": "abc", "payload": 1, "submitted_at": 1, "attempt": 1, "colour": "red"}',
            "unknown field(s): colour",
        ),
        (b'{"id": "a b", "payload": 1, "submitted_at": 1, "attempt": 1}', "field 'id'"),
        (b'{"id": "abc", "payload": 1, "submitted_at": 1, "attempt": true}', "field 'attempt'"),
        (b"\xff\xfe not utf-8", "not valid JSON"),
    ],
)
def test_malformed_envelopes_are_dead_lettered_with_the_reason(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, raw: bytes, reason: str
) -> None:
    keys = PoolKeys(pool)
    r.lpush(keys.queue, raw)
    ready(start_slot())
    wait_for(lambda: r.llen(keys.dead) == 1, 10, what="dead letter")
    entry = dead_letters(r, pool)[0]
    assert reason in str(entry["reason"])
    assert entry["envelope"] == raw.decode(errors="replace")
    assert r.llen(keys.inflight(0)) == 0
    with Client(redis_url, pool) as client:  # the pool keeps its throughput
        assert client.call({"after": True}, timeout=10)["echo"] == {"after": True}


def test_malformed_envelope_with_a_readable_id_answers_its_waiter(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    r.lpush(PoolKeys(pool).queue, b'{"id": "job-7", "payload": 1, "attempt": 0, "submitted_at": 1}')
    ready(start_slot())
    with Client(redis_url, pool) as client, pytest.raises(JobFailed, match="field 'attempt'"):
        client.result("job-7", timeout=10)


def test_oversize_envelope(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    big = {"blob": "x" * 5000}
    with Client(redis_url, pool, max_envelope_bytes=4096) as client:
        with pytest.raises(EnvelopeError, match="over the limit of 4096 bytes"):
            client.submit(big)
        assert r.llen(PoolKeys(pool).queue) == 0
    # a producer that ignores the limit: the slot dead-letters it unread
    raw = make_envelope(big).to_json()
    r.lpush(PoolKeys(pool).queue, raw)
    ready(start_slot(extra=("--max-envelope-bytes", "4096")))
    wait_for(lambda: r.llen(PoolKeys(pool).dead) == 1, 10, what="dead letter")
    assert "over the limit of 4096 bytes" in str(dead_letters(r, pool)[0]["reason"])


def test_unknown_handler_is_dead_lettered(start_slot: StartSlot, redis_url: str, pool: str) -> None:
    ready(start_slot(extra=("--handler", "slow=tests.handlers:sleep")))
    with Client(redis_url, pool) as client:
        assert client.call({"seconds": 0.01}, timeout=10, handler="slow")["slept"] == 0.01
        with pytest.raises(JobFailed, match=r"unknown handler 'nope'; this pool serves: .*slow"):
            client.call({}, timeout=10, handler="nope")


def test_unloadable_handler_fails_fast_with_a_clear_error(
    start_slot: StartSlot,
) -> None:
    slot = start_slot(handler="no_such_module:fn")
    assert slot.wait(20) == 2
    assert "cannot import 'no_such_module'" in slot.output()


def test_deadline_passed_is_answered_expired_without_a_call(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    with Client(redis_url, pool) as client:
        job_id = client.submit({"late": True}, deadline=time.time() - 1)
        ready(start_slot())
        with pytest.raises(JobExpired):
            client.result(job_id, timeout=10)
    assert read_stats(r, pool, slots=1).counters["expired"] == 1


def test_non_json_result_is_a_failure_not_a_crash(
    start_slot: StartSlot, redis_url: str, pool: str
) -> None:
    ready(start_slot(handler="tests.handlers:not_json", extra=("--max-attempts", "1")))
    with Client(redis_url, pool) as client, pytest.raises(JobFailed, match="not JSON serializable"):
        client.call({}, timeout=10)


def test_queue_full_rejects_the_whole_batch(redis_url: str, pool: str, r: redis.Redis) -> None:
    write_pool_config(r, pool, slots=1, max_queue_length=3)
    with Client(redis_url, pool) as client:
        client.submit_many([1, 2])
        with pytest.raises(QueueFull) as full:
            client.submit_many([3, 4])
        assert (full.value.depth, full.value.limit) == (2, 3)
        client.submit(3)
        with pytest.raises(QueueFull):
            client.submit(4)
    assert r.llen(PoolKeys(pool).queue) == 3


def test_result_timeout(redis_url: str, pool: str) -> None:
    with Client(redis_url, pool) as client:
        started = time.monotonic()
        with pytest.raises(ResultTimeout):
            client.result("never-submitted", timeout=0.5)
        assert 0.4 < time.monotonic() - started < 3


def test_health_endpoints_and_metrics(start_slot: StartSlot, redis_url: str, pool: str) -> None:
    slot = start_slot()
    ready(slot)
    assert slot.status("/healthz") == 200
    with Client(redis_url, pool) as client:
        client.call({}, timeout=10)
    metrics = slot.text("/metrics")
    assert f'apipool_calls_total{{outcome="ok",pool="{pool}",slot="0"}} 1.0' in metrics
    assert "apipool_queue_wait_seconds_bucket" in metrics
    assert "apipool_lease_losses_total" in metrics


def test_sigterm_finishes_the_call_releases_the_lease_and_exits_0(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    slot = start_slot(handler="tests.handlers:sleep")
    ready(slot)
    keys = PoolKeys(pool)
    with Client(redis_url, pool) as client:
        job_id = client.submit({"seconds": 1.0})
        wait_for(lambda: r.llen(keys.inflight(0)) == 1, 5, what="call started")
        slot.signal(signal.SIGTERM)
        assert slot.wait(10) == 0
        assert client.wait(job_id, 1).status == "ok"
    assert r.get(keys.lease(0)) is None
    assert r.llen(keys.inflight(0)) == 0


def test_a_second_holder_waits_until_the_first_is_gone(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    first = start_slot(owner="pod-a")
    ready(first)
    second = start_slot(owner="pod-b")
    wait_for(lambda: second.status("/healthz") == 200, 10, what="second slot up")
    assert second.status("/readyz") == 503
    with Client(redis_url, pool) as client:
        results = [client.call({}, timeout=10) for _ in range(5)]
    assert all(res["slot"] == 0 for res in results)
    assert second.status("/readyz") == 503  # still waiting: never two holders
    first.signal(signal.SIGTERM)
    assert first.wait(10) == 0
    ready(second)
    assert r.get(PoolKeys(pool).lease(0)).startswith(b"pod-b/")


def test_replacement_of_a_dead_predecessor_takes_over_at_once(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    # call timeout 10 s: the lease would outlive the dead process by ~13 s
    first = start_slot(owner="pod-a", call_timeout=10)
    ready(first)
    assert r.pttl(PoolKeys(pool).lease(0)) > 10_000
    first.signal(signal.SIGKILL)
    first.wait(10)
    started = time.monotonic()
    second = start_slot(owner="pod-a", call_timeout=10)
    ready(second)
    assert time.monotonic() - started < 5
    assert "took over the lease of dead predecessor pod-a/" in second.output()


def test_job_left_in_flight_by_a_killed_slot_is_retried_once(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    first = start_slot(handler="tests.handlers:sleep", owner="pod-a")
    ready(first)
    with Client(redis_url, pool) as client:
        job_id = client.submit({"seconds": 30})
        wait_for(lambda: r.llen(keys.inflight(0)) == 1, 5, what="call started")
        first.signal(signal.SIGKILL)
        first.wait(10)
        # the replacement recovers the job as attempt 2; make it short this time
        raw = r.lindex(keys.inflight(0), 0)
        assert raw is not None
        assert json.loads(raw)["attempt"] == 1
        second = start_slot(handler="tests.handlers:echo", owner="pod-a")
        finished = client.wait(job_id, 15)
    assert finished.status == "ok"
    assert finished.attempt == 2
    assert r.llen(keys.result(job_id)) == 1
    assert read_stats(r, pool, slots=1).counters["recovered"] == 1
    assert second.status("/readyz") == 200


def test_job_left_in_flight_after_the_last_attempt_is_dead_lettered(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    env = make_envelope({"x": 1})
    last = json.loads(env.to_json()) | {"attempt": 3}
    r.lpush(keys.inflight(0), json.dumps(last))
    ready(start_slot(extra=("--max-attempts", "3")))
    with (
        Client(redis_url, pool) as client,
        pytest.raises(JobFailed, match="slot died during attempt 3 of 3"),
    ):
        client.result(env.id, timeout=10)


def test_a_slot_whose_lease_is_taken_stops_calling(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    slot = start_slot(heartbeat=0.1)
    ready(slot)
    r.set(keys.lease(0), b"someone-else/1", px=60_000)
    wait_for(lambda: slot.status("/readyz") == 503, 5, what="lease loss noticed")
    with Client(redis_url, pool) as client:
        job_id = client.submit({})
        with pytest.raises(ResultTimeout):
            client.result(job_id, timeout=1.0)
        assert r.llen(keys.queue) + r.llen(keys.inflight(0)) == 1  # waiting, not called
        assert "apipool_lease_losses_total" in slot.text("/metrics")
        r.delete(keys.lease(0))
        assert client.wait(job_id, 10).status == "ok"


def test_sync_handler_overrunning_its_timeout_kills_the_process(
    start_slot: StartSlot, redis_url: str, pool: str
) -> None:
    slot = start_slot(handler="tests.handlers:block_sync", call_timeout=0.5)
    ready(slot)
    with Client(redis_url, pool) as client:
        client.submit({"seconds": 30})
        assert slot.wait(15) == ExitCode.SLOT_OVERRUN
    assert "overran its timeout" in slot.output()


def test_a_slot_beyond_the_pools_size_calls_nothing(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    """After a scale-down, a process that outlived its pod must not act as slot N+1."""
    write_pool_config(r, pool, slots=1)
    slot = start_slot(1, heartbeat=0.1)
    wait_for(lambda: slot.status("/healthz") == 200, 15, what="slot up")
    with Client(redis_url, pool) as client:
        job_id = client.submit({})
        with pytest.raises(ResultTimeout):
            client.result(job_id, timeout=1.0)
        assert slot.status("/readyz") == 503
        assert "beyond the pool's 1 slots" in slot.output()
        write_pool_config(r, pool, slots=2)  # scaled up again: slot 1 exists now
        assert client.wait(job_id, 10).status == "ok"


def test_reply_to_key_that_is_not_a_list_is_answered_at_the_default_key(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    reply_to = f"{keys.reply_prefix}batch"
    r.set(reply_to, "not a list")
    env = make_envelope({"x": 1}, reply_to=reply_to)
    r.lpush(keys.queue, env.to_json())
    ready(start_slot())
    with Client(redis_url, pool) as client, pytest.raises(JobFailed, match="is not a list"):
        client.result(env.id, timeout=10)
    assert r.get(reply_to) == b"not a list"  # left as it was
    entries = dead_letters(r, pool)
    assert [e["id"] for e in entries] == [env.id]
    assert "is not a list" in str(entries[0]["reason"])
    assert r.llen(keys.inflight(0)) == 0
