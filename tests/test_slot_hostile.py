"""Real slot processes against hostile or careless input, on a real redis-server.

Handlers that escape with a BaseException, fail for good or return what cannot
be stored; envelopes past their attempts or answering at a key that is not a
list; a Redis that refuses the slot's steps (an ACL user with a key pattern) or
may evict keys; secrets in failure texts; an envelope over the size limit
brought by a blocking take. The handlers are in tests/handlers.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from apipool import Client, JobFailed
from apipool.envelope import make_envelope
from apipool.layout import PoolKeys
from apipool.stats import read_stats
from apipool.testing.redis_server import RedisServer

from .conftest import ROOT, SUBPROCESS_ENV, SlotProcess, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

StartSlot = Callable[..., SlotProcess]
H = "tests.handlers"
ESCAPES = ("SystemExit", "KeyboardInterrupt", "HandlerEscape")
EVICTING = (
    "redis may evict keys (maxmemory-policy allkeys-lru): set noeviction or pass --allow-eviction"
)


# -- helpers -------------------------------------------------------------------------------


def ready(slot: SlotProcess) -> None:
    wait_for(lambda: slot.status("/readyz") == 200, 20, what="slot ready")


def readyz(slot: SlotProcess) -> tuple[int, str]:
    """(status, reason) of /readyz; (0, "") while nothing answers."""
    try:
        with urllib.request.urlopen(slot.base + "/readyz", timeout=2) as response:
            return int(response.status), str(json.loads(response.read())["reason"])
    except urllib.error.HTTPError as exc:
        return int(exc.code), str(json.loads(exc.read())["reason"])
    except OSError:
        return 0, ""


def metric(slot: SlotProcess, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(slot.text("/metrics")):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def calls(log: Path) -> list[tuple[int, str, int]]:
    """Every call a counting handler recorded: (pid, job id, attempt)."""
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines()]
    return [(int(pid), job, int(attempt)) for pid, job, attempt in rows]


def dead_letters(r: redis.Redis, pool: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in r.lrange(PoolKeys(pool).dead, 0, -1)]


def log_lines(slot: SlotProcess, level: str, text: str) -> list[str]:
    return [line for line in slot.output().splitlines() if f" {level} " in line and text in line]


@pytest.fixture
def acl_user(r: redis.Redis, redis_url: str) -> Iterator[Callable[..., tuple[str, str]]]:
    """Makes a Redis user allowed every command on the given key patterns only;
    returns (name, URL). Deleted at teardown."""
    made: list[str] = []

    def make(*patterns: str) -> tuple[str, str]:
        name = f"slot-{uuid.uuid4().hex[:8]}"
        r.execute_command("ACL", "SETUSER", name, "on", ">pw", *patterns, "+@all")
        made.append(name)
        return name, redis_url.replace("redis://", f"redis://{name}:pw@")

    yield make
    for name in made:
        r.execute_command("ACL", "DELUSER", name)


def set_keys(r: redis.Redis, user: str, *patterns: str) -> None:
    """Replace the key patterns of ``user`` (its open connections follow at once)."""
    r.execute_command("ACL", "SETUSER", user, "resetkeys", *patterns)


def slot_keys(keys: PoolKeys) -> tuple[str, ...]:
    """What a slot needs besides the dead list, the stats and the results."""
    return (
        f"~{keys.queue}",
        f"~{keys.base}:inflight:*",
        f"~{keys.base}:lease:*",
        f"~{keys.config}",
    )


# -- handlers that escape, fail for good, or return what cannot be stored --------------------


def test_a_handler_raising_a_base_exception_ends_its_job_not_the_slot(
    start_slot: StartSlot, redis_url: str, pool: str, tmp_path: Path
) -> None:
    log = tmp_path / "calls"
    slot = start_slot(
        handler=f"{H}:raise_base",
        extra=(
            "--handler", f"aio={H}:raise_base_async",
            "--handler", f"echo={H}:echo",
            "--max-attempts", "3",
        ),
    )  # fmt: skip
    ready(slot)
    with Client(redis_url, pool) as client:
        jobs = {
            (kind, handler): client.submit({"kind": kind, "log": str(log)}, handler=handler)
            for kind in ESCAPES
            for handler in (None, "aio")
        }
        for (kind, _), job_id in jobs.items():
            with pytest.raises(
                JobFailed, match=rf"attempt 1 of 3 failed for good: handler raised {kind}"
            ):
                client.result(job_id, timeout=20)
        assert client.call({"after": 1}, timeout=20, handler="echo")["echo"] == {"after": 1}
    assert slot.proc.poll() is None  # the same process carried on
    assert sorted(job for _, job, _ in calls(log)) == sorted(jobs.values())  # one call each
    assert {pid for pid, _, _ in calls(log)} == {slot.proc.pid}
    assert metric(slot, "apipool_failures_total", cause="permanent") == 6


def test_permanent_errors_and_unstorable_results_are_dead_lettered_after_one_call(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    log = tmp_path / "calls"
    slot = start_slot(
        handler=f"{H}:permanent_failure",
        extra=(
            "--handler", f"not_json={H}:counted_not_json",
            "--handler", f"big={H}:counted_big_result",
            "--max-attempts", "3",
            "--max-result-bytes", "1000",
        ),
    )  # fmt: skip
    ready(slot)
    secret_url = "https://api.example/v1/items?api_key=SECRET123&page=2"
    with Client(redis_url, pool) as client:
        refused = client.submit({"log": str(log), "url": secret_url})
        not_json = client.submit({"log": str(log)}, handler="not_json")
        fits = client.submit({"log": str(log), "size": 998}, handler="big")
        too_big = client.submit({"log": str(log), "size": 999}, handler="big")
        with pytest.raises(JobFailed, match="failed for good: PermanentError: 422 from") as failed:
            client.result(refused, timeout=20)
        assert "SECRET123" not in failed.value.reason
        assert "api_key=[redacted]" in failed.value.reason
        with pytest.raises(JobFailed, match="result is not JSON-serialisable: TypeError"):
            client.result(not_json, timeout=20)
        assert client.result(fits, timeout=20) == "x" * 998  # 1000 bytes of JSON: at the limit
        with pytest.raises(JobFailed, match="result of 1001 bytes is over the limit of 1000 bytes"):
            client.result(too_big, timeout=20)
    per_job = [job for _, job, _ in calls(log)]
    assert sorted(per_job) == sorted([refused, not_json, fits, too_big])  # one call each
    assert read_stats(r, pool, slots=1).counters["retried"] == 0
    assert metric(slot, "apipool_failures_total", cause="bad result") == 2
    assert "SECRET123" not in slot.output()


def test_failure_texts_are_redacted_in_logs_and_dead_letters(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    slot = start_slot(handler=f"{H}:leaky_failure", extra=("--max-attempts", "2"))
    ready(slot)
    payload = {"url": "https://api.example/v1?token=QUERYSECRET", "token": "Bearer HEADERSECRET"}
    with Client(redis_url, pool) as client:
        job_id = client.submit(payload)
        with pytest.raises(JobFailed, match="attempt 2 of 2 failed: RuntimeError") as failed:
            client.result(job_id, timeout=20)
    assert "token=[redacted]" in failed.value.reason
    assert '"Authorization": "[redacted]"' in failed.value.reason
    assert log_lines(slot, "INFO", f"job {job_id} attempt 1 failed")  # the retry was logged
    reasons = [entry["reason"] for entry in dead_letters(r, pool)]
    for text in (slot.output(), json.dumps(reasons), failed.value.reason):
        assert "QUERYSECRET" not in text
        assert "HEADERSECRET" not in text


# -- wire-format gaps ---------------------------------------------------------------------------


def test_an_attempt_past_max_attempts_is_dead_lettered_uncalled(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    log = tmp_path / "calls"
    env = make_envelope({"log": str(log)})
    doc = json.loads(env.to_json())
    r.lpush(PoolKeys(pool).queue, json.dumps({**doc, "attempt": 9}))
    ready(start_slot(handler=f"{H}:record_call", extra=("--max-attempts", "3")))
    with (
        Client(redis_url, pool) as client,
        pytest.raises(JobFailed, match="max_attempts") as failed,
    ):
        client.result(env.id, timeout=20)
    assert "attempt 9" in failed.value.reason
    assert calls(log) == []


def test_a_result_key_or_reply_to_that_is_not_a_list_is_dead_lettered_before_the_call(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    keys = PoolKeys(pool)
    log = tmp_path / "calls"
    own = make_envelope({"log": str(log)})
    r.hset(keys.result(own.id), "taken", "by something else")
    reply_to = f"{keys.reply_prefix}batch"
    r.set(reply_to, "not a list")
    replied = make_envelope({"log": str(log)}, reply_to=reply_to)
    r.lpush(keys.queue, own.to_json(), replied.to_json())
    ready(start_slot(handler=f"{H}:record_call"))
    wait_for(lambda: len(dead_letters(r, pool)) == 2, 20, what="two dead letters")
    reasons = {d["id"]: d["reason"] for d in dead_letters(r, pool)}
    assert "is not a list (it holds a hash); no result written" in reasons[own.id]
    assert "is not a list (it holds a string)" in reasons[replied.id]
    with Client(redis_url, pool) as client, pytest.raises(JobFailed, match="is not a list"):
        client.result(replied.id, timeout=10)  # answered at its own result key instead
    assert calls(log) == []
    assert r.hgetall(keys.result(own.id)) == {b"taken": b"by something else"}
    assert r.get(reply_to) == b"not a list"
    assert r.llen(keys.inflight(0)) == 0


def test_a_result_key_that_turns_into_no_list_during_the_call_strands_nothing(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis, tmp_path: Path
) -> None:
    """TYPE said the key was free; by the outcome it holds a string: COMPLETE
    answers WRONG_TYPE and the outcome becomes a dead letter without a result."""
    keys = PoolKeys(pool)
    log, gate = tmp_path / "calls", tmp_path / "gate"
    slot = start_slot(handler=f"{H}:gated")
    ready(slot)
    with Client(redis_url, pool) as client:
        job_id = client.submit({"log": str(log), "gate": str(gate)})
    wait_for(lambda: calls(log), 20, what="the call")
    r.set(keys.result(job_id), "squatter")
    gate.touch()
    wait_for(lambda: dead_letters(r, pool), 20, what="a dead letter")
    entry = dead_letters(r, pool)[0]
    assert entry["id"] == job_id
    assert "is not a list; no result written" in entry["reason"]
    assert r.get(keys.result(job_id)) == b"squatter"
    assert r.llen(keys.inflight(0)) == 0
    assert len(calls(log)) == 1
    assert slot.proc.poll() is None


# -- a Redis that refuses the slot's steps ----------------------------------------------------


def test_a_slot_whose_takes_redis_refuses_neither_spins_nor_exits(
    start_slot: StartSlot,
    redis_url: str,
    pool: str,
    r: redis.Redis,
    acl_user: Callable[..., tuple[str, str]],
) -> None:
    """The user may not touch the dead list, the stats or the results, which
    TAKE declares: every take is refused. The slot says so on /readyz, keeps its
    lease, tries again every 10 s, and serves once the ACL lets it."""
    keys = PoolKeys(pool)
    user, url = acl_user(*slot_keys(keys))
    with Client(redis_url, pool) as client:
        job_id = client.submit({"n": 1})
    slot = start_slot(extra=("--redis-url", url))

    def refused() -> bool:
        status, reason = readyz(slot)
        return status == 503 and reason.startswith("redis refused taking a job: NoPermission")

    wait_for(refused, 20, what="/readyz saying why")
    seen_at = time.monotonic()
    permanent = {"kind": "permanent"}
    wait_for(lambda: metric(slot, "apipool_redis_errors_total", **permanent) >= 2, 30)
    assert time.monotonic() - seen_at > 5  # the second try came seconds later, not at once
    assert metric(slot, "apipool_redis_errors_total", **permanent) <= 3
    assert slot.proc.poll() is None
    assert slot.status("/healthz") == 200
    assert r.get(keys.lease(0)) is not None  # the heartbeat goes on
    assert r.llen(keys.queue) == 1  # not taken
    assert r.llen(keys.inflight(0)) == 0
    assert len(log_lines(slot, "ERROR", "redis refused taking a job")) == 1  # then quieter
    set_keys(r, user, f"~{keys.base}:*")
    with Client(redis_url, pool) as client:
        assert client.wait(job_id, 30).status == "ok"
    wait_for(lambda: readyz(slot) == (200, "ok"), 20, what="ready again")


def test_an_outcome_redis_refuses_stays_in_flight_until_redis_takes_it(
    start_slot: StartSlot,
    redis_url: str,
    pool: str,
    r: redis.Redis,
    acl_user: Callable[..., tuple[str, str]],
    tmp_path: Path,
) -> None:
    """The ACL changes during the call: neither the outcome nor a minimal dead
    letter can be written. The job stays in flight (no second call), the slot
    says why and waits; once Redis takes it, the original outcome is written."""
    keys = PoolKeys(pool)
    user, url = acl_user(f"~{keys.base}:*")
    log, gate = tmp_path / "calls", tmp_path / "gate"
    slot = start_slot(handler=f"{H}:gated", extra=("--redis-url", url))
    ready(slot)
    with Client(redis_url, pool) as client:
        job_id = client.submit({"log": str(log), "gate": str(gate)})
    wait_for(lambda: calls(log), 20, what="the call")
    set_keys(r, user, *slot_keys(keys))
    gate.touch()

    def refused() -> bool:
        status, reason = readyz(slot)
        return status == 503 and "redis refused" in reason and "NoPermissionError" in reason

    wait_for(refused, 20, what="/readyz saying why")
    assert [json.loads(x)["id"] for x in r.lrange(keys.inflight(0), 0, -1)] == [job_id]
    assert slot.proc.poll() is None
    assert slot.status("/healthz") == 200
    assert metric(slot, "apipool_redis_errors_total", kind="permanent") <= 4
    set_keys(r, user, f"~{keys.base}:*")
    with Client(redis_url, pool) as client:
        finished = client.wait(job_id, 30)
    assert (finished.status, finished.result) == ("ok", {"attempt": 1})
    assert len(calls(log)) == 1
    assert r.llen(keys.inflight(0)) == 0
    wait_for(lambda: readyz(slot) == (200, "ok"), 20, what="ready again")


def test_a_result_key_redis_will_not_show_is_dead_lettered_uncalled(
    start_slot: StartSlot,
    pool: str,
    r: redis.Redis,
    acl_user: Callable[..., tuple[str, str]],
    tmp_path: Path,
) -> None:
    keys = PoolKeys(pool)
    _, url = acl_user(*slot_keys(keys), f"~{keys.dead}", f"~{keys.stats}")
    log = tmp_path / "calls"
    slot = start_slot(handler=f"{H}:record_call", extra=("--redis-url", url))
    ready(slot)
    env = make_envelope({"log": str(log)})
    r.lpush(keys.queue, env.to_json())
    wait_for(lambda: dead_letters(r, pool), 20, what="a dead letter")
    entry = dead_letters(r, pool)[0]
    assert entry["id"] == env.id
    assert entry["reason"].startswith("redis refused checking result key")
    assert "NoPermissionError" in entry["reason"]
    assert calls(log) == []
    assert r.llen(keys.inflight(0)) == 0
    wait_for(lambda: readyz(slot) == (200, "ok"), 20, what="ready again")


# -- a Redis that may evict keys ----------------------------------------------------------------


def test_a_slot_serves_only_while_redis_cannot_evict_keys(
    start_slot: StartSlot, pool: str, tmp_path: Path
) -> None:
    with RedisServer() as own:
        admin = redis.Redis.from_url(own.url, socket_timeout=5)
        admin.config_set("maxmemory", "100mb")
        admin.config_set("maxmemory-policy", "allkeys-lru")
        keys = PoolKeys(pool)
        with Client(own.url, pool) as client:
            job_id = client.submit({"n": 1})
        slot = start_slot(extra=("--redis-url", own.url))
        wait_for(lambda: readyz(slot) == (503, EVICTING), 20, what="/readyz saying why")
        wait_for(lambda: admin.get(keys.lease(0)), 10, what="the lease (held all the same)")
        assert admin.llen(keys.queue) == 1  # not taken
        assert admin.llen(keys.inflight(0)) == 0
        admin.config_set("maxmemory-policy", "noeviction")
        with Client(own.url, pool) as client:
            assert client.wait(job_id, 20).status == "ok"
        wait_for(lambda: readyz(slot) == (200, "ok"), 10, what="ready")
        assert len(log_lines(slot, "ERROR", "redis may evict keys")) == 1
        assert log_lines(slot, "INFO", "serving again")

        admin.config_set("maxmemory-policy", "allkeys-lru")
        allowed_pool = f"{pool}-allowed"
        allowed = start_slot(
            pool_name=allowed_pool, extra=("--redis-url", own.url, "--allow-eviction")
        )
        ready(allowed)
        with Client(own.url, allowed_pool) as client:
            assert client.call({"n": 2}, timeout=20)["echo"] == {"n": 2}
        assert log_lines(allowed, "WARNING", "serving anyway (--allow-eviction)")
        admin.close()


# -- memory and counters -------------------------------------------------------------------------


def test_an_envelope_over_the_limit_brought_by_a_blocking_take_is_dead_lettered_unread(
    start_slot: StartSlot, pool: str, r: redis.Redis
) -> None:
    keys = PoolKeys(pool)
    slot = start_slot(extra=("--max-envelope-bytes", "4096", "--take-block", "5"))
    ready(slot)

    def blocked_take() -> bool:
        return any(c.get("cmd") == "blmove" for c in r.client_list())

    wait_for(blocked_take, 20, what="the slot blocked in BLMOVE")
    env = make_envelope({"blob": "x" * 5000})
    raw = env.to_json().encode()
    r.lpush(keys.queue, raw)
    wait_for(lambda: dead_letters(r, pool), 20, what="a dead letter")
    entry = dead_letters(r, pool)[0]
    assert entry["reason"] == f"envelope of {len(raw)} bytes is over the limit of 4096 bytes"
    assert entry["id"] is None  # never parsed: its id is not known
    assert entry["envelope"] is None
    assert entry["envelope_bytes"] == len(raw)
    assert r.exists(keys.result(env.id)) == 0
    assert r.llen(keys.inflight(0)) == 0
    assert log_lines(slot, "WARNING", "over-limit envelope(s) dead-lettered by size")  # WAIT's
    assert metric(slot, "apipool_failures_total", cause="malformed") == 1


def test_dead_letters_trimmed_off_the_capped_list_are_counted_for_stats(
    start_slot: StartSlot, redis_url: str, pool: str, r: redis.Redis
) -> None:
    ready(start_slot(extra=("--max-dead-letters", "2")))
    for n in range(5):
        r.lpush(PoolKeys(pool).queue, f"not an envelope {n}")
    wait_for(lambda: read_stats(r, pool, slots=1).counters["dead"] == 5, 20, what="5 dead")
    stats = read_stats(r, pool, slots=1)
    assert (stats.dead_letters, stats.dead_trimmed, stats.counters["dead_trimmed"]) == (2, 3, 3)
    cmd = [sys.executable, "-m", "apipool", "stats", "--redis-url", redis_url, "--pool", pool]
    text = subprocess.run(cmd, env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True, timeout=30)
    assert "dead_trimmed=3" in text.stdout.decode()
    as_json = subprocess.run([*cmd, "--json"], env=SUBPROCESS_ENV, cwd=ROOT, capture_output=True)
    assert json.loads(as_json.stdout)["dead_trimmed"] == 3
