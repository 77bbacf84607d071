"""Real slot processes: signals, probes, self-fencing, hand-backs, take-next, metrics.

The handlers the slot processes run are in tests/handlers.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from apipool import Client
from apipool.envelope import make_envelope
from apipool.exitcodes import ExitCode
from apipool.layout import PoolKeys
from apipool.stats import write_pool_config

from .conftest import SlotProcess, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.chaos, pytest.mark.timeout(90)]

StartSlot = Callable[..., SlotProcess]
HERE = "tests.handlers"


# -- handlers run by the slot processes ---------------------------------------------------


# -- helpers -------------------------------------------------------------------------------


def probe(slot: SlotProcess, path: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a probe; (0, {}) while nothing answers."""
    try:
        with urllib.request.urlopen(slot.base + path, timeout=2) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())
    except OSError:
        return 0, {}


def ready(slot: SlotProcess) -> None:
    wait_for(lambda: slot.status("/readyz") == 200, 20, what="slot ready")


def callers(log: Path) -> list[int]:
    """The pid of every call recorded in ``log``."""
    if not log.exists():
        return []
    return [int(line.split()[0]) for line in log.read_text().splitlines()]


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


# -- signals and the parent watch -----------------------------------------------------------


def test_sigusr1_dumps_every_task_and_the_slot_goes_on(
    start_slot: StartSlot, redis_url: str, pool: str
) -> None:
    slot = start_slot()
    ready(slot)
    slot.signal(signal.SIGUSR1)
    wait_for(lambda: "--- heartbeat:" in slot.output(), 10, what="task dump")
    assert slot.proc.poll() is None
    with Client(redis_url, pool) as client:
        assert client.call({"after": "dump"}, timeout=10)["echo"] == {"after": "dump"}


def test_sigint_stops_gracefully_and_releases_the_lease(
    start_slot: StartSlot, pool: str, r: redis.Redis
) -> None:
    slot = start_slot()
    ready(slot)
    assert r.exists(PoolKeys(pool).lease(0)) == 1
    slot.signal(signal.SIGINT)
    assert slot.wait(15) == ExitCode.OK
    assert r.exists(PoolKeys(pool).lease(0)) == 0
    assert "lease released" in slot.output()


def test_a_slot_stops_by_itself_when_its_parent_is_not_the_given_one(
    start_slot: StartSlot, pool: str, r: redis.Redis
) -> None:
    # Its real parent is this test process: given that pid, it stays.
    kept = start_slot(0, extra=("--parent-pid", str(os.getpid())))
    ready(kept)
    orphan = start_slot(1, extra=("--parent-pid", str(os.getpid() + 100_000)))
    assert orphan.wait(20) == ExitCode.OK
    assert f"supervisor (pid {os.getpid() + 100_000}) is gone; stopping" in orphan.output()
    assert kept.proc.poll() is None
    assert kept.status("/readyz") == 200
    assert r.exists(PoolKeys(pool).lease(1)) == 0


# -- probes ----------------------------------------------------------------------------------


def test_healthz_fails_once_a_call_overruns_its_timeout(
    start_slot: StartSlot, redis_url: str, pool: str
) -> None:
    slot = start_slot(
        handler=f"{HERE}:ignore_cancel", call_timeout=0.5, extra=("--health-grace", "0.5")
    )
    ready(slot)
    expected = {"ok": True, "reason": "ok", "slot": 0, "pool": pool, "pid": slot.proc.pid}
    assert probe(slot, "/healthz") == (200, expected)
    with Client(redis_url, pool) as client:
        client.submit({"seconds": 60})

    def failing() -> dict[str, Any] | None:
        status, body = probe(slot, "/healthz")
        return body if status == 503 else None

    body = wait_for(failing, 15, what="/healthz failing")
    assert body["ok"] is False
    assert "over its timeout" in body["reason"]
    assert body["reason"].startswith("call running for ")


def test_readiness_says_why_a_slot_cannot_call(
    start_slot: StartSlot, pool: str, r: redis.Redis
) -> None:
    holder = start_slot(0, owner="pod-a")
    ready(holder)
    waiting = start_slot(0, owner="pod-b")
    write_pool_config(r, pool, slots=2)
    surplus = start_slot(2, owner="pod-c")
    no_redis = start_slot(1, extra=("--redis-url", "redis://127.0.0.1:1/0"))

    def reason(slot: SlotProcess) -> str | None:
        status, body = probe(slot, "/readyz")
        return body.get("reason") if status == 503 else None

    wait_for(lambda: reason(waiting) == "lease not held", 20, what="lease not held")
    wait_for(lambda: reason(surplus) == "slot index is beyond the pool's size", 20, what="surplus")
    wait_for(lambda: reason(no_redis) == "redis unreachable", 20, what="redis unreachable")
    for slot in (waiting, surplus, no_redis):
        assert slot.status("/healthz") == 200  # alive all the same: nothing to restart
    assert probe(holder, "/readyz")[1]["reason"] == "ok"


def test_a_stop_that_hangs_ends_with_slot_stuck_and_a_task_dump(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    slot = start_slot(handler=f"{HERE}:ignore_cancel", call_timeout=0.5)
    ready(slot)
    with Client(redis_url, pool) as client:
        client.submit({"seconds": 120})
    wait_for(lambda: r.llen(PoolKeys(pool).inflight(0)) == 1, 10, what="call started")
    stopped_at = time.monotonic()
    slot.signal(signal.SIGTERM)
    assert slot.wait(60) == ExitCode.SLOT_STUCK
    # shutdown grace = 0.5 + 0.2 + 2 x 0.2 = 1.1 s; the watchdog fires 5 s after it
    assert time.monotonic() - stopped_at >= 6.0
    output = slot.output()
    assert "still not stopped; dumping tasks and exiting" in output
    assert "--- heartbeat:" in output


# -- self-fencing and hand-backs ----------------------------------------------------------------


def test_a_slot_resumed_after_its_lease_ran_out_calls_nothing(
    start_slot: StartSlot, redis_url: str, pool: str, tmp_path: Path
) -> None:
    """SIGSTOP outlasts the lease; another owner takes the slot over. On SIGCONT
    the old process must not call before its heartbeat finds the lease gone:
    its local clock already says the lease ran out."""
    log = tmp_path / "calls.log"
    first = start_slot(owner="pod-a", handler=f"{HERE}:record_call", call_timeout=1)
    ready(first)
    second = start_slot(owner="pod-b", handler=f"{HERE}:record_call", call_timeout=1)
    wait_for(lambda: second.status("/healthz") == 200, 20, what="second slot up")
    first.signal(signal.SIGSTOP)
    ready(second)  # the lease (2.8 s) ran out and pod-b took it
    with Client(redis_url, pool) as client:
        before = client.submit_many([{"log": str(log)}] * 3)
        first.signal(signal.SIGCONT)
        after = client.submit_many([{"log": str(log)}] * 5)
        for job_id in before + after:
            assert client.wait(job_id, 20).status == "ok"
    wait_for(lambda: "lease lost" in first.output(), 10, what="lease loss noticed")
    assert first.status("/readyz") == 503
    assert set(callers(log)) == {second.proc.pid}
    assert len(callers(log)) == 8  # one call per job


def stop_while_taking(slot: SlotProcess, r: redis.Redis, pool: str, raw: bytes) -> None:
    """SIGSTOP the slot while its BLMOVE is pending and let Redis move ``raw`` to
    it: the job is then taken, but the process has not seen it."""
    keys = PoolKeys(pool)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        slot.signal(signal.SIGSTOP)
        r.lpush(keys.queue, raw)
        try:
            wait_for(lambda: r.llen(keys.inflight(0)) == 1, 1.0, what="taken while stopped")
            return
        except AssertionError:  # it was not blocked in a take: try again
            r.lrem(keys.queue, 1, raw)
            slot.signal(signal.SIGCONT)
            wait_for(lambda: slot.status("/readyz") == 200, 10, what="ready again")
    raise AssertionError("never caught the slot inside a take")


def test_a_job_taken_but_never_started_goes_back_first_in_line_at_stop(
    start_slot: StartSlot, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    keys = PoolKeys(pool)
    log = tmp_path / "calls.log"
    slot = start_slot(owner="pod-a", handler=f"{HERE}:record_call", call_timeout=1)
    ready(slot)
    raw = make_envelope({"log": str(log)}).to_json().encode()
    stop_while_taking(slot, r, pool, raw)
    wait_for(lambda: r.exists(keys.lease(0)) == 0, 10, what="lease ran out")
    r.set(keys.lease(0), b"pod-z/1", px=60_000)  # and someone else holds it now
    slot.signal(signal.SIGCONT)
    wait_for(lambda: "lease lost" in slot.output(), 10, what="lease loss noticed")
    slot.signal(signal.SIGTERM)
    assert slot.wait(20) == ExitCode.OK
    assert callers(log) == []
    assert r.llen(keys.inflight(0)) == 0
    assert r.lrange(keys.queue, 0, -1) == [raw]  # unchanged: attempt 1, first in line
    assert r.get(keys.lease(0)) == b"pod-z/1"  # theirs, not released by us


def test_a_busy_slot_takes_each_next_job_along_with_the_last_outcome(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    slot = start_slot(call_timeout=2)
    ready(slot)

    def blmoves() -> int:
        return int(r.info("commandstats").get("cmdstat_blmove", {}).get("calls", 0))

    before = blmoves()
    with Client(redis_url, pool) as client:
        client.submit_many([{"n": n} for n in range(40)])
    wait_for(lambda: int(r.hget(keys.stats, "ok") or 0) == 40, 30, interval=0.01, what="40 done")
    takes = blmoves() - before
    # One blocking take starts the run; the other 39 jobs came with an outcome
    # (a few more takes: idle polls every 0.2 s, a renewal running late).
    assert takes <= 12, takes


def test_metrics_count_jobs_by_outcome_and_failures_by_cause(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    slot = start_slot(
        handler="tests.handlers:fail_first",
        extra=("--handler", "boom=tests.handlers:always_raise", "--max-attempts", "2"),
    )
    ready(slot)
    with Client(redis_url, pool) as client:
        retried_then_ok = client.submit({})
        retried_then_dead = client.submit({}, handler="boom")
        unknown = client.submit({}, handler="nope")
        expired = client.submit({}, deadline=time.time() - 1)
        r.lpush(keys.queue, b"not an envelope")
        for job_id in (retried_then_ok, retried_then_dead, unknown, expired):
            client.wait(job_id, 20)
    wait_for(lambda: r.llen(keys.dead) == 3, 10, what="three dead letters")
    text = slot.text("/metrics")
    by_outcome = {
        outcome: metric(text, "apipool_calls_total", outcome=outcome)
        for outcome in ("ok", "expired", "dead", "retried", "recovered")
    }
    assert by_outcome == {"ok": 1, "expired": 1, "dead": 3, "retried": 2, "recovered": 0}
    by_cause = {
        cause: metric(text, "apipool_failures_total", cause=cause)
        for cause in ("error", "timeout", "malformed", "unknown handler")
    }
    assert by_cause == {"error": 3, "timeout": 0, "malformed": 1, "unknown handler": 1}
    assert metric(text, "apipool_lease_held") == 1
    assert metric(text, "apipool_slot_busy") == 0
