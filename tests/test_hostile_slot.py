"""Hostile input pushed straight onto a pool's queue, against real slot processes.

A careless (or hostile) producer can ``LPUSH`` anything: bytes that are not
UTF-8, JSON that is not an object, objects shaped like envelopes with wrong
values, arrays nested thousands deep, envelopes of many megabytes. Whatever it
pushes, the slot process must stay the same process, healthy, and give every
push exactly one outcome (a result record or a dead letter, counted once),
leaving nothing in flight. The property test drives one long-lived slot with
arbitrary input; the tests after it stage each known bad case explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from apipool.envelope import ID_PATTERN
from apipool.layout import PoolKeys

from .conftest import ROOT, SlotProcess, wait_for

pytestmark = [pytest.mark.redis]

StartSlot = Callable[..., SlotProcess]

OUTCOMES = ("ok", "dead", "expired")
"""Counters of the stats hash that end a job; ``retried`` and ``recovered`` send it round."""
PROPERTY_LIMIT = 8192
"""``--max-envelope-bytes`` of the property test's slot: some pushes are over it."""
SETTLE = 20.0
"""Seconds a batch of pushes may take to reach its outcomes on a loaded machine."""
DEAD_LETTER_SCHEMA = json.loads(
    (ROOT / "operator" / "apipool" / "schemas" / "dead-letter.schema.json").read_text()
)


# -- the slot and what it wrote ---------------------------------------------------------


def ready(slot: SlotProcess) -> None:
    wait_for(lambda: slot.status("/readyz") == 200, 20, what="slot ready")


def counters(r: redis.Redis, pool: str) -> dict[str, int]:
    raw = r.hgetall(PoolKeys(pool).stats)
    return {k.decode(): int(v) for k, v in raw.items()}


def finished(r: redis.Redis, pool: str) -> int:
    c = counters(r, pool)
    return sum(c.get(name, 0) for name in OUTCOMES)


def dead_letters(r: redis.Redis, pool: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in r.lrange(PoolKeys(pool).dead, 0, -1)]


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of /proc/<pid>/status: the most memory the process ever had resident."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def drained(r: redis.Redis, pool: str, slot: int = 0) -> bool:
    keys = PoolKeys(pool)
    return r.llen(keys.queue) == 0 and r.llen(keys.inflight(slot)) == 0


def waiting_in_blmove(r: redis.Redis) -> bool:
    """Whether a client (the test's only slot) is blocked in BLMOVE: the WAIT step."""
    return any(c.get("cmd") == "blmove" and "b" in str(c.get("flags")) for c in r.client_list())


WAITING = ("--take-block", "10")
"""A slot that sits in one BLMOVE for long, so a push reaches it by WAIT, not by TAKE."""


def assert_same_healthy_process(slot: SlotProcess, pid: int) -> None:
    assert slot.proc.poll() is None, f"slot exited with {slot.proc.returncode}:\n{slot.output()}"
    assert slot.proc.pid == pid
    assert slot.status("/healthz") == 200, slot.output()


def echo_round_trip(r: redis.Redis, pool: str, job_id: str) -> dict[str, Any]:
    """Push one valid job and return its result record: the slot still serves."""
    env = {"id": job_id, "payload": {"still": "serving"}, "submitted_at": time.time(), "attempt": 1}
    r.lpush(PoolKeys(pool).queue, json.dumps(env))
    key = PoolKeys(pool).result(job_id)
    record = wait_for(lambda: r.lindex(key, -1), SETTLE, what=f"result of {job_id}")
    doc: dict[str, Any] = json.loads(record)
    return doc


# -- what a careless producer pushes ----------------------------------------------------

UNIQUE_ID = "\x00unique"
"""Placeholder of an envelope's ``id``: replaced by an id unique to the push."""

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
leaves = st.none() | st.booleans() | st.integers() | finite_floats | st.text(max_size=24)
json_values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
"""JSON values without NaN or Infinity (what json.dumps writes for those is not JSON)."""
any_floats = st.floats()
loose_values = st.recursive(
    st.none() | st.booleans() | st.integers() | any_floats | st.text(max_size=24),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
"""Python values json.dumps accepts, NaN and Infinity included."""


def junk_or(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, json_values)


envelope_like = st.fixed_dictionaries(
    {
        "id": st.one_of(st.just(UNIQUE_ID), json_values),
        "payload": json_values,
        "submitted_at": junk_or(st.floats(0, 4e9) | st.integers(-5, 4_000_000_000)),
        "attempt": junk_or(st.integers(-2, 6) | st.just(10**30) | st.just(2.0)),
    },
    optional={
        "deadline": junk_or(st.none() | st.floats(0, 4e9)),
        "reply_to": junk_or(st.none() | st.text(max_size=12)),
        "handler": junk_or(st.none() | st.sampled_from(["echo", "nope", ""])),
        "meta": json_values,
        "colour": json_values,
    },
).filter(lambda doc: "reply_to" not in doc or not str(doc["reply_to"]).startswith("apipool:"))
"""Envelope-shaped objects with random field values; none names a valid reply_to, so
an outcome with a readable id goes to ``result:<id>``."""


@dataclass(frozen=True)
class Push:
    """One push and what must become of it."""

    raw: bytes
    job_id: str | None = None
    """Set when the push is a small JSON object with a valid, unique ``id``: exactly one
    result record must appear at its result key."""
    echo: Any = None
    """Set (with ``ok``) for a valid envelope: the result must echo this payload."""
    ok: bool = False


@dataclass(frozen=True)
class Draft:
    """A push before its unique id is known."""

    kind: str
    value: Any

    def make(self, job_id: str) -> Push:
        """The push, given an id unique to it (used only where the draft asks for one)."""
        assert ID_PATTERN.fullmatch(job_id)
        if self.kind == "bytes":
            return Push(self.value)
        if self.kind == "valid":
            env = {"id": job_id, "payload": self.value, "submitted_at": 1.0, "attempt": 1}
            raw = json.dumps(env).encode()
            small = len(raw) <= PROPERTY_LIMIT  # over the limit, not even the id is read
            return Push(raw, job_id if small else None, self.value, ok=small)
        if self.kind == "envelope":
            doc = {k: job_id if v == UNIQUE_ID else v for k, v in self.value.items()}
            raw = json.dumps(doc).encode()
            readable = doc.get("id") == job_id and len(raw) <= PROPERTY_LIMIT
            return Push(raw, job_id if readable else None)
        return Push(json.dumps(self.value, ensure_ascii=self.kind == "ascii").encode())


def nested(n: int, opening: bytes, closing: bytes) -> bytes:
    return opening * n + closing * n


deep = st.one_of(
    st.integers(1, 3000).map(lambda n: nested(n, b"[", b"]")),
    st.integers(1, 3000).map(lambda n: b"[" * n),
    st.integers(1, 1500).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(1, 2000).map(
        lambda n: (
            b'{"id":"deep","payload":' + nested(n, b"[", b"]") + b',"submitted_at":1,"attempt":1}'
        )
    ),
)
oversized = st.integers(PROPERTY_LIMIT + 1, 4 * PROPERTY_LIMIT).map(lambda n: b"x" * n)

drafts = st.one_of(
    st.binary(max_size=600).map(lambda b: Draft("bytes", b)),
    deep.map(lambda b: Draft("bytes", b)),
    oversized.map(lambda b: Draft("bytes", b)),
    loose_values.map(lambda v: Draft("ascii", v)),
    loose_values.map(lambda v: Draft("utf8", v)),
    envelope_like.map(lambda d: Draft("envelope", d)),
    json_values.map(lambda v: Draft("valid", v)),
)


@pytest.fixture
def hostile_slot(
    start_slot: StartSlot, r: redis.Redis, pool: str
) -> tuple[SlotProcess, int, bytes]:
    """One slot for the whole property test: its process, pid and lease token."""
    slot = start_slot(extra=("--max-envelope-bytes", str(PROPERTY_LIMIT)))
    ready(slot)
    token = r.get(PoolKeys(pool).lease(0))
    assert token is not None
    return slot, slot.proc.pid, token


def check_outcomes(r: redis.Redis, pool: str, pushes: list[Push]) -> None:
    """Every push with a unique id has exactly one result record; valid ones were echoed."""
    keys = PoolKeys(pool)
    for push in pushes:
        if push.job_id is None:
            continue
        records = r.lrange(keys.result(push.job_id), 0, -1)
        assert len(records) == 1, (push.raw[:200], records)
        record = json.loads(records[0])
        assert record["status"] in OUTCOMES
        if push.ok:
            assert record["status"] == "ok", (push.raw[:200], record)
            assert record["result"]["echo"] == push.echo


def check_dead_letters(entries: list[bytes]) -> None:
    """Each new dead letter follows its schema and stays small whatever was pushed."""
    for raw in entries:
        assert len(raw) <= 64 * 1024, raw[:200]
        jsonschema.validate(json.loads(raw), DEAD_LETTER_SCHEMA)


@pytest.mark.timeout(240)
@settings(
    max_examples=200,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: each run costs a real slot's time
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # the one slot serves every example on purpose
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@example(batch=[Draft("bytes", nested(2000, b"[", b"]"))])
@example(batch=[Draft("bytes", b"[" * 2000), Draft("bytes", b"")])
@example(batch=[Draft("bytes", b"\xff\xfe\x00"), Draft("bytes", b"NaN"), Draft("bytes", b"1e999")])
@example(
    batch=[Draft("envelope", {"id": UNIQUE_ID, "payload": 1, "submitted_at": 1, "attempt": 0})]
)
@given(batch=st.lists(drafts, min_size=1, max_size=4))
def test_every_push_gets_one_outcome_and_the_slot_survives(
    hostile_slot: tuple[SlotProcess, int, bytes], r: redis.Redis, pool: str, batch: list[Draft]
) -> None:
    slot, pid, token = hostile_slot
    keys = PoolKeys(pool)
    assert_same_healthy_process(slot, pid)
    pushes = [draft.make(f"h-{os.urandom(6).hex()}") for draft in batch]
    before, dead_before = counters(r, pool), r.llen(keys.dead)
    done_before = finished(r, pool)

    r.lpush(keys.queue, *[p.raw for p in pushes])
    wait_for(lambda: finished(r, pool) >= done_before + len(pushes), SETTLE, what="outcomes")
    wait_for(lambda: drained(r, pool), SETTLE, what="queue and in-flight list empty")

    after = counters(r, pool)
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert sum(delta.get(name, 0) for name in OUTCOMES) == len(pushes), delta
    assert delta.get("retried", 0) == 0, delta  # echo never fails: nothing may go round
    assert delta.get("recovered", 0) == 0, delta
    new_dead = r.llen(keys.dead) - dead_before
    assert new_dead == delta.get("dead", 0), (new_dead, delta)
    check_dead_letters(r.lrange(keys.dead, 0, new_dead - 1) if new_dead else [])
    check_outcomes(r, pool, pushes)
    assert_same_healthy_process(slot, pid)
    assert r.get(keys.lease(0)) == token  # the same incarnation holds the slot throughout


# -- known bad cases, one by one ---------------------------------------------------------

DEEP = nested(1000, b"[", b"]")
DEEP_ENVELOPE = b'{"id":"deep-1","payload":' + DEEP + b',"submitted_at":1,"attempt":1}'
"""About 2 KB, nested 1,000 levels deep: about as deep as Python's recursion limit lets
``json.loads`` go, and far deeper than ``defaults.MAX_JSON_DEPTH`` (64)."""


@pytest.mark.timeout(60)
def test_a_deeply_nested_envelope_is_dead_lettered_and_the_slot_goes_on(
    start_slot: StartSlot, r: redis.Redis, pool: str
) -> None:
    assert 2000 <= len(DEEP_ENVELOPE) <= 2100
    slot = start_slot()
    ready(slot)
    pid = slot.proc.pid
    r.lpush(PoolKeys(pool).queue, DEEP_ENVELOPE)
    wait_for(lambda: r.llen(PoolKeys(pool).dead) == 1, SETTLE, what="one dead letter")
    [entry] = dead_letters(r, pool)
    assert entry["reason"].startswith("malformed envelope")
    assert entry["envelope_bytes"] == len(DEEP_ENVELOPE)
    assert entry["envelope_sha1"] == hashlib.sha1(DEEP_ENVELOPE).hexdigest()
    assert echo_round_trip(r, pool, "after-deep")["status"] == "ok"
    assert_same_healthy_process(slot, pid)
    assert counters(r, pool)["dead"] == 1


@pytest.mark.timeout(60)
def test_a_deeply_nested_envelope_left_in_flight_is_dead_lettered_by_the_next_slot(
    start_slot: StartSlot, r: redis.Redis, pool: str
) -> None:
    """As if a slot died while holding it: its successor recovers it at start."""
    keys = PoolKeys(pool)
    r.lpush(keys.inflight(0), DEEP_ENVELOPE)
    slot = start_slot()
    wait_for(lambda: r.llen(keys.dead) == 1, SETTLE, what="the stranded job dead-lettered")
    wait_for(lambda: r.llen(keys.inflight(0)) == 0, SETTLE, what="in-flight list empty")
    ready(slot)
    pid = slot.proc.pid
    [entry] = dead_letters(r, pool)
    assert entry["envelope_sha1"] == hashlib.sha1(DEEP_ENVELOPE).hexdigest()
    assert echo_round_trip(r, pool, "after-recovery")["status"] == "ok"
    assert_same_healthy_process(slot, pid)
    assert r.llen(keys.queue) == 0
    assert counters(r, pool).get("recovered", 0) == 0  # not sent round again


def big_envelope(size: int) -> bytes:
    head, tail = b'{"id":"big-1","payload":"', b'","submitted_at":1,"attempt":1}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def assert_dead_by_size(r: redis.Redis, pool: str, raw: bytes, limit: int) -> None:
    [entry] = dead_letters(r, pool)
    assert entry["envelope_bytes"] == len(raw)
    assert entry["envelope_sha1"] == hashlib.sha1(raw).hexdigest()
    assert entry["envelope"] is None  # never read, so nothing of it is kept
    assert entry["id"] is None
    assert f"over the limit of {limit} bytes" in entry["reason"]
    assert len(r.lindex(PoolKeys(pool).dead, 0) or b"") < 4096
    assert r.exists(PoolKeys(pool).result("big-1")) == 0  # the id is not read either


@pytest.mark.timeout(90)
def test_an_envelope_over_the_limit_queued_before_the_take_never_reaches_the_slot(
    start_slot: StartSlot, r: redis.Redis, pool: str, redis_url: str
) -> None:
    """50 MB against the default 1 MiB limit: TAKE dead-letters it inside Redis, so the
    slot's peak memory stays that of a slot that never saw it."""
    raw = big_envelope(50 * 1000 * 1000)
    keys = PoolKeys(pool)
    r.lpush(keys.queue, raw)
    slot = start_slot()
    reference = start_slot(pool_name=f"{pool}-ref")  # the same slot, with nothing to refuse
    wait_for(lambda: r.llen(keys.dead) == 1, 30, what="the big envelope dead-lettered")
    ready(slot)
    ready(reference)
    assert echo_round_trip(r, pool, "after-big")["status"] == "ok"
    assert echo_round_trip(r, f"{pool}-ref", "ref")["status"] == "ok"
    assert_dead_by_size(r, pool, raw, 1 << 20)
    peak, baseline = peak_rss_bytes(slot.proc.pid), peak_rss_bytes(reference.proc.pid)
    # Within 16 MiB of the slot that never saw it: never a third of the 50 MB read.
    assert peak < baseline + 16 * 1024 * 1024, (peak, baseline)


@pytest.mark.timeout(60)
def test_an_envelope_over_the_limit_arriving_while_waiting_is_dead_lettered_by_size(
    start_slot: StartSlot, r: redis.Redis, pool: str
) -> None:
    """The blocking take (WAIT) hands the slot the whole element; it is refused by its
    size without being parsed or kept."""
    limit = 4096
    slot = start_slot(extra=("--max-envelope-bytes", str(limit), *WAITING))
    ready(slot)
    pid = slot.proc.pid
    raw = big_envelope(64 * 1024)
    wait_for(lambda: waiting_in_blmove(r), SETTLE, what="the slot waiting in BLMOVE")
    r.lpush(PoolKeys(pool).queue, raw)
    wait_for(lambda: r.llen(PoolKeys(pool).dead) == 1, SETTLE, what="dead letter")
    assert_dead_by_size(r, pool, raw, limit)
    assert echo_round_trip(r, pool, "after-waiting")["status"] == "ok"
    assert_same_healthy_process(slot, pid)


@pytest.mark.timeout(60)
def test_the_dead_letter_list_is_capped_and_what_is_trimmed_is_counted(
    start_slot: StartSlot, r: redis.Redis, pool: str
) -> None:
    keys = PoolKeys(pool)
    r.lpush(keys.queue, *[f"not json {i}".encode() for i in range(12)])
    slot = start_slot(extra=("--max-dead-letters", "5"))
    wait_for(lambda: counters(r, pool).get("dead", 0) == 12, SETTLE, what="12 dead letters")
    wait_for(lambda: drained(r, pool), SETTLE, what="queue drained")
    assert r.llen(keys.dead) == 5
    assert counters(r, pool)["dead_trimmed"] == 7
    kept = [entry["envelope"] for entry in dead_letters(r, pool)]
    assert kept == [f"not json {i}" for i in (11, 10, 9, 8, 7)]  # the newest, newest first
    ready(slot)
    assert echo_round_trip(r, pool, "after-cap")["status"] == "ok"


def called(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def envelope(job_id: str, payload: Any, attempt: Any) -> bytes:
    doc = {"id": job_id, "payload": payload, "submitted_at": time.time(), "attempt": attempt}
    return json.dumps(doc).encode()


@pytest.mark.timeout(60)
def test_an_attempt_above_max_attempts_is_never_called(
    start_slot: StartSlot, r: redis.Redis, pool: str, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    keys = PoolKeys(pool)
    payload = {"log": str(log)}
    slot = start_slot(handler="tests.handlers:record_call", extra=("--max-attempts", "3"))
    ready(slot)
    pid = slot.proc.pid
    over = {"over-4": 4, "over-huge": 10**18}
    for job_id, attempt in over.items():
        r.lpush(keys.queue, envelope(job_id, payload, attempt))
    r.lpush(keys.queue, envelope("last-allowed", payload, 3))  # FIFO: answered after them
    last = wait_for(lambda: r.lindex(keys.result("last-allowed"), -1), SETTLE, what="control")
    assert json.loads(last)["status"] == "ok"
    for job_id in over:
        record = json.loads(r.lindex(keys.result(job_id), -1) or b"null")
        assert record is not None, job_id
        assert record["status"] == "dead", (job_id, record)
    assert [line[1:] for line in called(log)] == [["last-allowed", "3"]]
    assert {entry["id"] for entry in dead_letters(r, pool)} == set(over)
    assert counters(r, pool).get("retried", 0) == 0
    assert_same_healthy_process(slot, pid)


@pytest.mark.timeout(60)
def test_a_result_key_that_is_not_a_list_is_found_before_the_call(
    start_slot: StartSlot, r: redis.Redis, pool: str, tmp_path: Path
) -> None:
    """Someone wrote a string where the job's result list goes: the job is not called
    (its result could not be written), and is dead-lettered instead of stranded."""
    log = tmp_path / "calls.log"
    keys = PoolKeys(pool)
    r.set(keys.result("squatted"), "not a list")
    slot = start_slot(handler="tests.handlers:record_call")
    ready(slot)
    pid = slot.proc.pid
    r.lpush(keys.queue, envelope("squatted", {"log": str(log)}, 1))
    wait_for(lambda: r.llen(keys.dead) == 1, SETTLE, what="dead letter")
    wait_for(lambda: drained(r, pool), SETTLE, what="nothing left in flight")
    assert [entry["id"] for entry in dead_letters(r, pool)] == ["squatted"]
    assert called(log) == []
    assert r.get(keys.result("squatted")) == b"not a list"
    assert_same_healthy_process(slot, pid)


@pytest.fixture
def small_bulk_limit(r: redis.Redis) -> Iterator[int]:
    """The test's Redis accepts no string over 1 MB from a client (the least it allows),
    as docs/operations.md advises; restored afterwards."""
    before = str(r.config_get("proto-max-bulk-len")["proto-max-bulk-len"])
    r.config_set("proto-max-bulk-len", "1mb")
    yield 1 << 20
    r.config_set("proto-max-bulk-len", before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["arrives while waiting", "left in flight"])
def test_an_element_larger_than_a_client_may_send_is_still_dead_lettered(
    start_slot: StartSlot, r: redis.Redis, pool: str, where: str, small_bulk_limit: int
) -> None:
    """Elements already in Redis can be larger than ``proto-max-bulk-len`` (queued before
    it was lowered, or built by a script). A slot that got one must dead-letter it
    without sending it back whole, which Redis would refuse, again and again."""
    keys = PoolKeys(pool)
    side = f"{keys.base}:side"  # a list of the pool that no slot reads
    raw = big_envelope(2 * small_bulk_limit)
    r.config_set("proto-max-bulk-len", "8mb")
    r.lpush(keys.inflight(0) if where == "left in flight" else side, raw)
    r.config_set("proto-max-bulk-len", str(small_bulk_limit))
    slot = start_slot(extra=WAITING)
    if where == "arrives while waiting":
        ready(slot)
        wait_for(lambda: waiting_in_blmove(r), SETTLE, what="the slot waiting in BLMOVE")
        r.lmove(side, keys.queue, "RIGHT", "LEFT")  # a short command moving a big element
    wait_for(lambda: r.llen(keys.dead) == 1, SETTLE, what="dead letter")
    wait_for(lambda: drained(r, pool), SETTLE, what="nothing left in flight")
    assert_dead_by_size(r, pool, raw, 1 << 20)
    ready(slot)
    assert echo_round_trip(r, pool, "after-huge")["status"] == "ok"
