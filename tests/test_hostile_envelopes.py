"""Hostile and careless input against the envelope, recovery and client code.

Unit (property-based and one test per known bad case): whatever bytes sit in a
queue or an in-flight list, ``parse_envelope`` raises only EnvelopeError,
``salvage_id``, ``dead_letter`` and ``recover`` raise nothing, ``recover``
decides exactly one outcome, and a dead-letter entry is bounded, carries the
envelope's size and SHA-1 and holds none of its secrets.

Redis: the Lua side of the same bounds through ``PoolProtocol`` (TAKE
dead-letters an over-limit envelope unread, COMPLETE writes no result key it is
not given, the dead-letter list is capped and what is dropped counted, SUBMIT
takes 9,000 envelopes in one call) and the client's batch limit.
"""

from __future__ import annotations

import hashlib
import json
import string
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apipool import defaults
from apipool.client import Client, JobResult
from apipool.envelope import (
    ID_PATTERN,
    Envelope,
    json_depth,
    make_envelope,
    parse_envelope,
    salvage_id,
)
from apipool.errors import ConfigError, EnvelopeError, JobFailed, QueueFull
from apipool.protocol import FinishCode, Outcome, PoolProtocol
from apipool.recovery import (
    Recovery,
    attempt_problem,
    dead_letter,
    dead_letter_step,
    recover,
    recovery_step,
)
from apipool.stats import write_pool_config

LIMIT = defaults.DEAD_LETTER_ENVELOPE_BYTES
MAX_BYTES = 64 * 1024  # the envelope limit of the unit tests
PROTO = PoolProtocol("hostile")
ENTRY_FIELDS = {
    "id",
    "reason",
    "slot",
    "attempt",
    "failed_at",
    "envelope",
    "envelope_bytes",
    "envelope_sha1",
}
# No example database in the tree; no per-example deadline on a loaded machine.
PROPERTY = settings(
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)


@cache
def dead_letter_schema() -> jsonschema.Draft202012Validator:
    text = (resources.files("apipool") / "schemas" / "dead-letter.schema.json").read_text()
    return jsonschema.Draft202012Validator(json.loads(text))


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict(text: str | bytes) -> Any:
    return json.loads(text, parse_constant=_not_json)


def check_entry(entry: str, raw: bytes) -> dict[str, Any]:
    """What every dead-letter entry guarantees, whoever wrote it and whatever ``raw`` was."""
    assert entry.isascii()
    doc = strict(entry)
    assert set(doc) == ENTRY_FIELDS
    errors = [e.message for e in dead_letter_schema().iter_errors(doc)]
    assert not errors, errors
    assert doc["envelope_bytes"] == len(raw)
    assert doc["envelope_sha1"] == hashlib.sha1(raw).hexdigest()
    assert len(doc["reason"].encode()) <= LIMIT
    if doc["envelope"] is not None:
        assert len(doc["envelope"].encode()) <= LIMIT
    return dict(doc)


def check_recovery(raw: bytes, rec: Recovery, *, max_attempts: int = 3) -> None:
    """Exactly one outcome: a retry that a slot accepts, or a sound dead letter."""
    assert (rec.retry is None) != (rec.dead is None)
    if rec.retry is not None:
        assert rec.env is not None
        assert rec.env.attempt < max_attempts
        again = parse_envelope(rec.retry, max_bytes=MAX_BYTES)
        assert again.attempt == rec.env.attempt + 1
        assert again.payload == rec.env.payload
    else:
        assert rec.dead is not None
        entry = check_entry(rec.dead.entry, raw)
        record = strict(rec.dead.record)
        assert record["status"] == "dead"
        assert record["error"] == entry["reason"] == rec.dead.reason
        assert rec.dead.job_id is None or ID_PATTERN.fullmatch(rec.dead.job_id)


def recover_raw(raw: bytes, *, max_attempts: int = 3, max_bytes: int = MAX_BYTES) -> Recovery:
    return recover(
        raw, proto=PROTO, slot=0, max_attempts=max_attempts, max_bytes=max_bytes, why="slot died"
    )


def envelope_json(**fields: Any) -> bytes:
    doc: dict[str, Any] = {"id": "job-1", "payload": None, "submitted_at": 1.5, "attempt": 1}
    doc.update(fields)
    return json.dumps(doc).encode()


def nested(depth: int) -> bytes:
    """An envelope whose objects and arrays nest ``depth`` deep (the envelope is one)."""
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)
    return b'{"id":"deep","payload":' + inner + b',"submitted_at":1,"attempt":1}'


# -- strategies -------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
job_ids = st.text(alphabet=string.ascii_letters + string.digits + "._:-", min_size=1, max_size=8)
envelope_docs = st.fixed_dictionaries(
    {
        "id": job_ids | json_values,
        "payload": json_values,
        "submitted_at": st.floats(min_value=0, allow_infinity=False) | json_values,
        "attempt": st.integers(min_value=-2, max_value=6) | json_values,
    },
    optional={
        "deadline": st.none() | st.floats(min_value=0, allow_infinity=False) | json_values,
        "reply_to": st.just("apipool:{hostile}:reply:r") | json_values,
        "handler": st.none() | st.text(max_size=8) | json_values,
        "meta": st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        "colour": json_values,
    },
)


@st.composite
def mangled_envelopes(draw: st.DrawFn) -> bytes:
    """A valid envelope with bytes cut, inserted or replaced somewhere."""
    doc = draw(envelope_docs)
    raw = json.dumps(doc).encode()
    at = draw(st.integers(min_value=0, max_value=len(raw)))
    cut = draw(st.integers(min_value=0, max_value=8))
    junk = draw(st.binary(max_size=8) | st.sampled_from([b"[" * 200, b"NaN", b"1e999", b"\\"]))
    return raw[:at] + junk + raw[at + cut :]


hostile_bytes = (
    st.binary(max_size=300)
    | envelope_docs.map(lambda d: json.dumps(d).encode())
    | mangled_envelopes()
)


# -- properties ---------------------------------------------------------------------


def parsed_or_reason(raw: str | bytes) -> Envelope | str:
    """The envelope, or the reason it was refused; any other exception propagates."""
    try:
        return parse_envelope(raw, max_bytes=MAX_BYTES)
    except EnvelopeError as exc:
        reason = str(exc)
    assert reason
    return reason


@pytest.mark.unit
@PROPERTY
@given(raw=hostile_bytes)
def test_parse_envelope_raises_nothing_but_envelope_error(raw: bytes) -> None:
    env = parsed_or_reason(raw)
    if isinstance(env, Envelope):
        assert parse_envelope(env.to_json(), max_bytes=MAX_BYTES) == env  # written back as it was


@pytest.mark.unit
@PROPERTY
@given(value=json_values)
def test_any_json_value_is_parsed_or_refused_with_a_reason(value: Any) -> None:
    for raw in (json.dumps(value), envelope_json(payload=value)):
        parsed_or_reason(raw)


@pytest.mark.unit
@PROPERTY
@given(raw=hostile_bytes, max_bytes=st.sampled_from([16, 256, MAX_BYTES]))
def test_salvage_id_raises_nothing_and_returns_a_valid_id_or_none(
    raw: bytes, max_bytes: int
) -> None:
    job_id = salvage_id(raw, max_bytes=max_bytes)
    assert job_id is None or ID_PATTERN.fullmatch(job_id)
    if len(raw) > max_bytes:
        assert job_id is None


@pytest.mark.unit
@PROPERTY
@given(raw=hostile_bytes, max_attempts=st.integers(min_value=1, max_value=4))
def test_recover_decides_exactly_one_outcome_for_any_bytes(raw: bytes, max_attempts: int) -> None:
    check_recovery(raw, recover_raw(raw, max_attempts=max_attempts), max_attempts=max_attempts)


@pytest.mark.unit
@PROPERTY
@given(raw=hostile_bytes, reason=st.text(max_size=200), slot=st.integers(0, 99))
def test_dead_letter_raises_nothing_and_writes_a_sound_entry(
    raw: bytes, reason: str, slot: int
) -> None:
    dead = dead_letter(raw, reason, env=None, slot=slot, max_bytes=MAX_BYTES)
    entry = check_entry(dead.entry, raw)
    assert entry["slot"] == slot
    assert entry["attempt"] is None
    assert strict(dead.record)["error"] == entry["reason"]


@pytest.mark.unit
@PROPERTY
@given(payload=json_values, attempt=st.integers(min_value=1, max_value=5))
def test_dead_letter_of_a_parsed_envelope_keeps_its_id_and_attempt(
    payload: Any, attempt: int
) -> None:
    raw = envelope_json(payload=payload, attempt=attempt)
    try:
        env = parse_envelope(raw, max_bytes=MAX_BYTES)
    except EnvelopeError:  # a number beyond a double: covered above
        return
    dead = dead_letter(raw, "attempt failed", env=env, slot=1, max_bytes=MAX_BYTES)
    entry = check_entry(dead.entry, raw)
    assert (entry["id"], entry["attempt"]) == ("job-1", attempt)


@pytest.mark.unit
@PROPERTY
@given(payload=json_values, meta=st.none() | st.dictionaries(st.text(max_size=8), json_values))
def test_a_valid_envelope_with_attempts_left_is_requeued_unchanged_but_its_attempt(
    payload: Any, meta: dict[str, Any] | None
) -> None:
    raw = envelope_json(payload=payload, meta=meta, attempt=2)
    if not isinstance(parsed_or_reason(raw), Envelope):  # a number beyond a double
        return
    rec = recover_raw(raw, max_attempts=3)
    check_recovery(raw, rec, max_attempts=3)
    assert rec.retry is not None
    again = parse_envelope(rec.retry)
    assert (again.attempt, again.payload, again.meta) == (3, payload, meta)


# -- one test per known bad case ------------------------------------------------------


@pytest.fixture
def no_json_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything calls json.loads."""

    def refuse(*_: object, **__: object) -> Any:
        raise AssertionError("json.loads was called")

    monkeypatch.setattr(json, "loads", refuse)


@pytest.mark.unit
@pytest.mark.usefixtures("no_json_parsing")
def test_a_thousand_deep_envelope_is_refused_before_parsing() -> None:
    raw = nested(1000)
    assert len(raw) < 2100
    with pytest.raises(EnvelopeError, match="nests objects and arrays 1000 deep, over the limit"):
        parse_envelope(raw)
    assert salvage_id(raw, max_bytes=MAX_BYTES) is None
    rec = recover_raw(raw)
    assert rec.dead is not None
    assert "over the limit of 64" in rec.dead.reason
    assert rec.dead.job_id is None


@pytest.mark.unit
def test_nesting_is_checked_before_parsing_and_strings_do_not_count() -> None:
    parse_envelope(nested(defaults.MAX_JSON_DEPTH))
    with pytest.raises(EnvelopeError, match=f"over the limit of {defaults.MAX_JSON_DEPTH}"):
        parse_envelope(nested(defaults.MAX_JSON_DEPTH + 1))
    in_a_string = "[{" * 5000 + '\\"]'
    assert parse_envelope(envelope_json(payload=in_a_string)).payload == in_a_string
    assert json_depth(b'{"a": "]]]]", "b": [[1]]}') == 3
    assert json_depth(b"7") == 0


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_pathological_strings_are_scanned_in_linear_time() -> None:
    """An unterminated string of escaped quotes would make a naive regex quadratic."""
    for raw in (b'"' + b'\\"' * 400_000, b'"' + b'\\"' * 400_000 + b"\\", b"[" * 800_000):
        with pytest.raises(EnvelopeError):
            parse_envelope(raw, max_bytes=1 << 20)
        check_recovery(raw, recover_raw(raw, max_bytes=1 << 20))


@pytest.mark.unit
@pytest.mark.usefixtures("no_json_parsing")
def test_a_50_mb_envelope_is_never_parsed() -> None:
    raw = b'{"id":"big","payload":"' + b"x" * (50 << 20) + b'","submitted_at":1,"attempt":1}'
    with pytest.raises(EnvelopeError, match=f"over the limit of {MAX_BYTES} bytes"):
        parse_envelope(raw, max_bytes=MAX_BYTES)
    assert salvage_id(raw, max_bytes=MAX_BYTES) is None
    rec = recover_raw(raw)
    assert rec.dead is not None
    assert rec.dead.job_id is None  # the id is never read from an over-limit envelope
    entry = json.JSONDecoder().decode(rec.dead.entry)  # json.loads itself is refused here
    assert entry["envelope"] is None
    assert entry["envelope_bytes"] == len(raw)
    assert entry["envelope_sha1"] == hashlib.sha1(raw).hexdigest()
    assert len(rec.dead.entry) < 1024


@pytest.mark.unit
def test_invalid_utf8_is_refused_and_kept_with_replacement_characters() -> None:
    raw = b'{"id":"utf","payload":"caf\xe9\xff","submitted_at":1,"attempt":1}'
    with pytest.raises(EnvelopeError, match="not UTF-8"):
        parse_envelope(raw)
    rec = recover_raw(raw)
    assert rec.dead is not None
    entry = check_entry(rec.dead.entry, raw)
    assert "caf\ufffd\ufffd" in entry["envelope"]
    assert entry["id"] is None  # not UTF-8: not read at all


@pytest.mark.unit
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e309", "-1e400"])
@pytest.mark.parametrize("where", ["payload", "submitted_at", "meta"])
def test_nan_infinity_and_out_of_range_floats_are_refused(constant: str, where: str) -> None:
    value = f'{{"x": {constant}}}' if where == "meta" else constant
    raw = envelope_json(**{where: "@"}).replace(b'"@"', value.encode())
    with pytest.raises(EnvelopeError, match="not valid JSON"):
        parse_envelope(raw)
    assert salvage_id(raw, max_bytes=MAX_BYTES) == "job-1"  # the waiter still gets an answer
    rec = recover_raw(raw)
    check_recovery(raw, rec)
    assert rec.dead is not None
    assert rec.dead.job_id == "job-1"


@pytest.mark.unit
@pytest.mark.parametrize("digits", [310, 400, 5000, 100_000])
def test_integers_beyond_a_double_are_refused(digits: int) -> None:
    raw = envelope_json(payload="@").replace(b'"@"', b"9" * digits)
    with pytest.raises(EnvelopeError, match="out of range"):
        parse_envelope(raw, max_bytes=1 << 20)
    assert salvage_id(raw, max_bytes=1 << 20) == "job-1"
    check_recovery(raw, recover_raw(raw, max_bytes=1 << 20))


@pytest.mark.unit
def test_large_integers_within_a_double_round_trip_exactly() -> None:
    big = 10**300 + 7
    rec = recover_raw(envelope_json(payload={"n": big}, attempt=2))
    assert rec.retry is not None
    assert parse_envelope(rec.retry).payload == {"n": big}


@pytest.mark.unit
@pytest.mark.parametrize("attempt", ["0", "-1", '"1"', "1e309", "true", "null", "1.5", "[1]"])
def test_bad_attempts_are_refused(attempt: str) -> None:
    raw = envelope_json(attempt="@").replace(b'"@"', attempt.encode())
    with pytest.raises(EnvelopeError):
        parse_envelope(raw)
    rec = recover_raw(raw)
    check_recovery(raw, rec)
    assert rec.dead is not None
    assert rec.dead.reason.startswith("malformed envelope: ")


@pytest.mark.unit
def test_an_attempt_over_max_attempts_is_dead_lettered_not_requeued() -> None:
    over = parse_envelope(envelope_json(attempt=5))
    assert attempt_problem(over, 3) == "attempt 5 is over the pool's max_attempts of 3"
    assert attempt_problem(parse_envelope(envelope_json(attempt=3)), 3) is None
    raw = envelope_json(attempt=5, reply_to="apipool:{hostile}:reply:batch")
    rec = recover_raw(raw, max_attempts=3)
    check_recovery(raw, rec)
    assert rec.retry is None
    assert rec.dead is not None
    assert rec.dead.reason == "attempt 5 is over the pool's max_attempts of 3"
    assert rec.dead.reply_to == "apipool:{hostile}:reply:batch"  # a well-formed job: answered
    assert strict(rec.dead.entry)["attempt"] == 5
    last = recover_raw(envelope_json(attempt=3), max_attempts=3)
    assert last.dead is not None
    assert last.dead.reason == "slot died during attempt 3 of 3"
    assert recover_raw(envelope_json(attempt=2), max_attempts=3).retry is not None


@pytest.mark.unit
def test_a_retry_keeps_non_ascii_text_as_it_came() -> None:
    raw = json.dumps(
        {"id": "same", "payload": "é" * 300, "submitted_at": 1, "attempt": 1}, ensure_ascii=False
    ).encode()
    rec = recover_raw(raw, max_bytes=len(raw) + 10)
    check_recovery(raw, rec)
    assert rec.retry is not None
    assert len(rec.retry.encode()) <= len(raw) + 10


def test_a_retry_that_would_outgrow_the_limit_is_dead_lettered() -> None:
    # "1e-7" is 4 bytes as pushed and 5 as written back ("1e-07"): the retry grows.
    raw = (
        b'{"id":"grow","payload":['
        + b",".join([b"1e-7"] * 300)
        + b'],"submitted_at":1,"attempt":1}'
    )
    rec = recover_raw(raw, max_bytes=len(raw) + 10)
    check_recovery(raw, rec)
    assert rec.dead is not None
    assert "next envelope of" in rec.dead.reason


SECRETS = ("SEKRET-AUTH", "SEKRET-KEY", "SEKRET-COOKIE", "SEKRET-QUERY", "SEKRET-PASS")
SECRET_PAYLOAD = {
    "method": "POST",
    "url": "https://user:SEKRET-PASS@api.example.com/v1/charges?api_key=SEKRET-QUERY&page=2",
    "headers": {
        "Authorization": "Bearer SEKRET-AUTH",
        "X-Api-Key": "SEKRET-KEY",
        "cookie": "session=SEKRET-COOKIE",
        "Accept": "application/json",
    },
    "body": {"amount": 1200},
}
SECRET_REASON = (
    "attempt 3 of 3 failed: HTTP 503 from "
    "https://user:SEKRET-PASS@api.example.com/v1/charges?api_key=SEKRET-QUERY"
)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
        assert "SEKR" not in text  # not even a piece of one


@pytest.mark.unit
def test_a_dead_letter_of_a_parsed_envelope_keeps_no_secret() -> None:
    raw = envelope_json(payload=SECRET_PAYLOAD, attempt=3)
    env = parse_envelope(raw)
    dead = dead_letter(raw, SECRET_REASON, env=env, slot=0)
    entry = check_entry(dead.entry, raw)
    assert_no_secret(dead.entry, dead.record, dead.reason)
    kept = parse_envelope(entry["envelope"])  # still an envelope, secrets replaced
    assert kept.payload["headers"]["Authorization"] == "[redacted]"
    assert kept.payload["headers"]["Accept"] == "application/json"
    assert "api_key=[redacted]" in kept.payload["url"]
    assert entry["reason"].startswith("attempt 3 of 3 failed: HTTP 503 from https://")


@pytest.mark.unit
@pytest.mark.parametrize(
    "raw",
    [
        envelope_json(payload=SECRET_PAYLOAD, colour="red"),  # JSON, not an envelope
        envelope_json(payload=SECRET_PAYLOAD, attempt=9),  # over max_attempts
        envelope_json(payload=SECRET_PAYLOAD)[:-1] + b", oops",  # not JSON
        envelope_json(payload=SECRET_PAYLOAD, meta={"n": "@"}).replace(b'"@"', b"NaN"),
    ],
    ids=["unknown field", "attempt over max", "not JSON", "NaN in meta"],
)
def test_a_dead_letter_of_a_bad_envelope_keeps_no_secret(raw: bytes) -> None:
    rec = recover_raw(raw)
    check_recovery(raw, rec)
    assert rec.dead is not None
    assert_no_secret(rec.dead.entry, rec.dead.record)
    dead = dead_letter(raw, SECRET_REASON, env=None, slot=0)
    assert_no_secret(dead.entry, dead.record, dead.reason)


@pytest.mark.unit
def test_headers_a_pool_names_are_redacted_too() -> None:
    payload = {"url": "https://h/x", "headers": {"X-Tenant-Token": "SEKRET-KEY"}}
    for raw in (envelope_json(payload=payload), envelope_json(payload=payload)[:-1]):
        dead = dead_letter(
            raw,
            'failed: {"x-tenant-token": "SEKRET-AUTH"}',
            env=None,
            slot=0,
            redact_headers=("x-tenant-token",),
        )
        check_entry(dead.entry, raw)
        assert_no_secret(dead.entry, dead.record)
        rec = recover(
            raw,
            proto=PROTO,
            slot=0,
            max_attempts=1,
            max_bytes=MAX_BYTES,
            why="slot died",
            redact_headers=("X-Tenant-Token",),
        )
        assert rec.dead is not None
        assert_no_secret(rec.dead.entry)
        assert "SEKRET" in dead_letter(raw, "r", env=None, slot=0).entry  # not a default name


@pytest.mark.unit
def test_a_secret_is_not_cut_in_half_by_the_truncation() -> None:
    """Redaction runs on the whole envelope before it is cut: no piece of a
    secret survives at the cut."""
    for pad in range(LIMIT - 40, LIMIT + 5, 3):
        raw = (
            b'{"id": "pad", "payload": "' + b"p" * pad + b'", "headers": '
            b'{"Authorization": "Bearer SEKRET-AUTH"}, "url": "https://h/?k=SEKRET-QUERY" oops'
        )
        dead = dead_letter(raw, "malformed envelope: x", env=None, slot=0)
        entry = check_entry(dead.entry, raw)
        assert_no_secret(entry["envelope"])


@pytest.mark.unit
def test_entries_are_bounded_and_never_cut_inside_a_character() -> None:
    raw = envelope_json(payload="é" * 50_000).replace(b"\\u00e9", "é".encode())
    dead = dead_letter(raw, "ü" * 10_000, env=None, slot=0)
    entry = check_entry(dead.entry, raw)
    assert entry["envelope"].endswith("é")  # a whole character, within the limit
    assert LIMIT - 2 < len(entry["envelope"].encode()) <= LIMIT
    assert LIMIT - 2 < len(entry["reason"].encode()) <= LIMIT
    assert len(dead.entry) < 3 * LIMIT * 6  # JSON escapes included


@pytest.mark.unit
def test_a_lone_surrogate_neither_crashes_nor_leaks_into_the_entry() -> None:
    raw = envelope_json(payload="\ud800x", attempt=1)  # json.dumps writes the \ud800 escape
    rec = recover_raw(raw)
    assert rec.retry is not None
    assert parse_envelope(rec.retry).payload == "\ud800x"
    dead = dead_letter(raw, "why \udfff", env=None, slot=0)
    check_entry(dead.entry, raw)
    assert parse_envelope('{"id":"s","payload":"\ud800","submitted_at":1,"attempt":1}').id == "s"


@pytest.mark.unit
def test_recovery_names_exactly_one_outcome() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Recovery(None, None, None)


@pytest.mark.unit
def test_job_result_reads_a_malformed_record_as_a_clear_failure() -> None:
    for raw, why in [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"status": "ok"}', "'id' and 'status'"),
        (b'{"id": 7, "status": "ok"}', "'id' and 'status'"),
        (b"\xff", "not JSON"),
        (b"[" * 100_000, "not JSON"),
    ]:
        with pytest.raises(JobFailed, match=f"malformed result record: .*{why}") as caught:
            JobResult.from_json(raw, "job-9")
        assert caught.value.job_id == "job-9"
    odd = JobResult.from_json(
        b'{"id": "j", "status": "ok", "attempt": "x", "slot": [], "started_at": "t", "error": 5}'
    )
    assert (odd.attempt, odd.slot, odd.started_at, odd.error) == (0, -1, None, "5")


# -- Redis: the Lua side and the client -------------------------------------------------


def dead_entries(r: redis.Redis, proto: PoolProtocol) -> list[dict[str, Any]]:
    return [strict(item) for item in r.lrange(proto.keys.dead, 0, -1)]


@pytest.mark.redis
def test_take_dead_letters_an_over_limit_envelope_unread(r: redis.Redis, pool: str) -> None:
    proto = PoolProtocol(pool, max_envelope_bytes=1024, max_dead_letters=100)
    big = envelope_json(id="big", payload="x" * 2000)
    small = envelope_json(id="small")
    r.lpush(proto.keys.queue, big, small)  # big is taken first
    taken = proto.take(0).run(r)
    assert (taken.job, taken.skipped) == (small, 1)
    assert r.lrange(proto.keys.inflight(0), 0, -1) == [small]
    [entry] = dead_entries(r, proto)
    check_entry(json.dumps(entry), big)
    assert entry["reason"] == f"envelope of {len(big)} bytes is over the limit of 1024 bytes"
    assert (entry["id"], entry["attempt"], entry["envelope"]) == (None, None, None)
    assert int(r.hget(proto.keys.stats, "dead") or 0) == 1
    # only over-limit envelopes: none is ever returned, 16 at most per call
    r.lpush(proto.keys.queue, *[big] * 20)
    assert proto.take(1).run(r).skipped == 16
    rest = proto.take(1).run(r)
    assert (rest.job, rest.skipped) == (None, 4)
    assert r.llen(proto.keys.inflight(1)) == 0
    assert not r.exists(*(proto.keys.result(i) for i in ("big", "small")))


@pytest.mark.redis
def test_a_dead_letter_without_an_id_writes_no_result_key(r: redis.Redis, pool: str) -> None:
    proto = PoolProtocol(pool)
    raw = b"\x00 not an envelope {"
    r.lpush(proto.keys.queue, raw)
    assert proto.take(0).run(r).job == raw
    dead = dead_letter(raw, "malformed envelope: not JSON", env=None, slot=0)
    assert dead.job_id is None
    step = dead_letter_step(proto, 0, raw, dead, ttl_ms=60_000)
    assert step.run(r).code == FinishCode.DONE
    keys = {k.decode() for k in r.scan_iter(match=f"{proto.keys.base}:*")}
    assert keys == {proto.keys.dead, proto.keys.stats}
    [entry] = dead_entries(r, proto)
    check_entry(json.dumps(entry), raw)


@pytest.mark.redis
def test_the_dead_letter_list_is_capped_and_the_dropped_counted(r: redis.Redis, pool: str) -> None:
    proto = PoolProtocol(pool, max_envelope_bytes=512, max_dead_letters=5)
    for n in range(8):  # through COMPLETE: dead letters the slot writes
        raw = envelope_json(id=f"d{n}", attempt=9)
        r.lpush(proto.keys.queue, raw)
        assert proto.take(0).run(r).job == raw
        rec = recover_raw(raw)
        assert recovery_step(proto, 0, raw, rec, ttl_ms=60_000).run(r).code == FinishCode.DONE
    assert [e["id"] for e in dead_entries(r, proto)] == ["d7", "d6", "d5", "d4", "d3"]
    assert int(r.hget(proto.keys.stats, "dead_trimmed") or 0) == 3
    r.lpush(proto.keys.queue, *[b"x" * 600] * 4)  # through TAKE: over-limit ones
    assert proto.take(0).run(r).skipped == 4
    assert r.llen(proto.keys.dead) == 5
    assert int(r.hget(proto.keys.stats, "dead_trimmed") or 0) == 7


@pytest.mark.redis
def test_hostile_in_flight_jobs_each_get_exactly_one_outcome(r: redis.Redis, pool: str) -> None:
    """What a dead slot left, whatever it is, is requeued or dead-lettered; nothing stays."""
    proto = PoolProtocol(pool, max_envelope_bytes=4096)
    hostile = [
        nested(1000),
        b"\xff\xfe\x00",
        envelope_json(id="nan", payload="@").replace(b'"@"', b"NaN"),
        envelope_json(id="over", attempt=7),
        envelope_json(id="fine", attempt=1),
        b"x" * 5000,
        envelope_json(id="secret", payload=SECRET_PAYLOAD, colour="red"),
    ]
    r.rpush(proto.keys.inflight(3), *hostile)
    for raw in r.lrange(proto.keys.inflight(3), 0, -1):
        rec = recover(raw, proto=proto, slot=3, max_attempts=3, max_bytes=4096, why="slot died")
        assert recovery_step(proto, 3, raw, rec, ttl_ms=60_000).run(r).code == FinishCode.DONE
    assert r.llen(proto.keys.inflight(3)) == 0
    [requeued] = r.lrange(proto.keys.queue, 0, -1)
    assert parse_envelope(requeued).attempt == 2
    entries = dead_entries(r, proto)
    assert len(entries) == len(hostile) - 1
    for entry in entries:
        assert entry["envelope"] is None or len(entry["envelope"].encode()) <= LIMIT
        assert_no_secret(json.dumps(entry))
    for job_id in ("nan", "over", "secret"):  # ids that could be read: the waiter is answered
        record = strict(r.lindex(proto.keys.result(job_id), -1) or b"null")
        assert record["status"] == Outcome.DEAD


@pytest.mark.redis
def test_submit_takes_9000_envelopes_in_one_call(r: redis.Redis, pool: str) -> None:
    proto = PoolProtocol(pool)
    batch = [envelope_json(id=f"s{n}").decode() for n in range(9000)]
    answer = proto.submit(batch).run(r)
    assert (answer.accepted, answer.depth) == (True, 9000)
    assert r.lindex(proto.keys.queue, -1) == batch[0].encode()  # taken first
    assert r.lindex(proto.keys.queue, 0) == batch[-1].encode()
    assert int(r.hget(proto.keys.stats, "submitted") or 0) == 9000


@pytest.mark.redis
def test_client_submits_9000_payloads_all_or_nothing(
    r: redis.Redis, redis_url: str, pool: str
) -> None:
    keys = PoolProtocol(pool).keys
    with Client(redis_url, pool) as client:
        ids = client.submit_many([{"n": n} for n in range(9000)])
        assert len(set(ids)) == 9000
        assert r.llen(keys.queue) == 9000
        assert parse_envelope(r.lindex(keys.queue, -1) or b"").id == ids[0]
        write_pool_config(r, pool, slots=1, max_queue_length=17_000)
        with pytest.raises(QueueFull):
            client.submit_many([{"n": n} for n in range(9000)])
    assert r.llen(keys.queue) == 9000  # nothing of the refused batch


@pytest.mark.redis
def test_client_refuses_a_batch_over_the_limit_before_queueing_anything(
    r: redis.Redis, redis_url: str, pool: str
) -> None:
    too_many = (n for n in range(defaults.MAX_SUBMIT_BATCH + 1))
    with Client(redis_url, pool) as client:
        with pytest.raises(ConfigError, match=f"at most {defaults.MAX_SUBMIT_BATCH} .*split"):
            client.submit_many(too_many)
        assert client.submit_many([]) == []
    assert r.llen(PoolProtocol(pool).keys.queue) == 0


@pytest.mark.redis
def test_client_refuses_what_a_slot_would_dead_letter_unread(
    r: redis.Redis, redis_url: str, pool: str
) -> None:
    deep: Any = 1
    for _ in range(defaults.MAX_JSON_DEPTH):
        deep = [deep]
    with Client(redis_url, pool) as client:
        for payload, why in [
            (deep, "nests objects and arrays"),
            (10**400, "out of range"),
            (float("nan"), "payload is not JSON"),
            ({1j}, "payload is not JSON"),
        ]:
            with pytest.raises(EnvelopeError, match=why):
                client.submit(payload)
        client.submit(deep[0])  # one level less fits
    assert r.llen(PoolProtocol(pool).keys.queue) == 1


@pytest.mark.redis
def test_waiting_on_a_malformed_record_fails_clearly(
    r: redis.Redis, redis_url: str, pool: str
) -> None:
    keys = PoolProtocol(pool).keys
    r.rpush(keys.result("bad-1"), b'{"status": 3}')
    with Client(redis_url, pool) as client, pytest.raises(JobFailed, match="malformed result"):
        client.result("bad-1", timeout=5)


@pytest.mark.unit
def test_make_envelope_output_is_what_parse_envelope_accepts() -> None:
    built = make_envelope({"k": [1, 2.5, None]}, job_id="m-1", now=1)
    assert parse_envelope(built.to_json()) == built
