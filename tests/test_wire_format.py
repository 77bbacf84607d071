"""The wire format (docs/wire-format.md) against the code.

Unit: the envelope schema and ``parse_envelope`` agree on a table of envelopes;
what ``make_envelope``, ``result_record`` and ``dead_letter_entry`` write matches
the schemas (a dead letter also when cut, redacted or over the size limit); every
tagged example in the doc is valid and is what the pool writes.

Redis: a producer that knows only Redis commands (no apipool client) pushes
hand-written JSON and reads the outcomes a real slot process writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis

from apipool import defaults
from apipool.envelope import (
    dead_letter_entry,
    make_envelope,
    parse_envelope,
    result_record,
)
from apipool.errors import EnvelopeError
from apipool.http_handler import parse_http_request
from apipool.layout import PoolKeys
from apipool.protocol import SUBMIT, Outcome
from apipool.testing.polling import WaitTimeout, wait_for
from apipool.testing.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "wire-format.md"

ENVELOPE_SCHEMA = "job-envelope.schema.json"
RESULT_SCHEMA = "result-record.schema.json"
DEAD_SCHEMA = "dead-letter.schema.json"


@cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    """The validator of a schema shipped in the package (as an installed wheel has it)."""
    text = (resources.files("apipool") / "schemas" / name).read_text(encoding="utf-8")
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(raw: str | bytes) -> Any:
    """RFC 8259 JSON: Python's json also reads NaN and Infinity, which are not JSON."""
    return json.loads(raw, parse_constant=_not_json)


def schema_accepts(raw: str) -> bool:
    """What a validator in any language says: the text is JSON and matches the schema."""
    try:
        doc = strict_json(raw)
    except ValueError:
        return False
    return bool(validator(ENVELOPE_SCHEMA).is_valid(doc))


def parser_accepts(raw: str) -> bool:
    """What a slot says. Any exception other than EnvelopeError is a bug and propagates."""
    try:
        parse_envelope(raw)
    except EnvelopeError:
        return False
    return True


def assert_valid(schema: str, doc: Any) -> None:
    errors = sorted(validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, f"{schema}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


# -- the envelope table ----------------------------------------------------------

BASE: dict[str, Any] = {
    "id": "job-1",
    "payload": {"q": "hello", "n": [1, 2.5, None, True]},
    "submitted_at": 1767225600.25,
    "attempt": 1,
}
ID_CHARS = "ABCXYZabcxyz0189._:-"


def env(*, drop: tuple[str, ...] = (), **fields: Any) -> str:
    """BASE without ``drop``, with ``fields`` set, as JSON text."""
    doc = {name: value for name, value in BASE.items() if name not in drop}
    doc.update(fields)
    return json.dumps(doc, ensure_ascii=False)


def raw_env(**fields: str) -> str:
    """BASE with fields given as raw JSON text (for what json.dumps would not write)."""
    doc = {name: json.dumps(value) for name, value in BASE.items()}
    doc.update(fields)
    return "{" + ", ".join(f'"{name}": {text}' for name, text in doc.items()) + "}"


VALID = {
    "base": env(),
    "minimal, null payload": json.dumps(
        {"id": "a", "payload": None, "submitted_at": 0, "attempt": 1}
    ),
    "payload string": env(payload="just text"),
    "payload number": env(payload=-12.5e3),
    "payload false": env(payload=False),
    "payload array": env(payload=[{"a": 1}, [], "x"]),
    "payload empty object": env(payload={}),
    "submitted_at int": env(submitted_at=1767225600),
    "submitted_at zero": env(submitted_at=0),
    "submitted_at tiny": env(submitted_at=1e-9),
    "attempt 7": env(attempt=7),
    "attempt big": env(attempt=10**12),
    "deadline null": env(deadline=None),
    "deadline zero": env(deadline=0),
    "deadline float": env(deadline=1767225660.5),
    "deadline before submitted_at": env(deadline=5),
    "reply_to null": env(reply_to=None),
    "reply_to key": env(reply_to="apipool:{wire}:reply:batch-7"),
    "handler null": env(handler=None),
    "handler name": env(handler="http"),
    "handler blank": env(handler=" "),
    "meta null": env(meta=None),
    "meta empty": env(meta={}),
    "meta nested": env(meta={"trace": "abc", "tags": ["x"], "n": {"deep": None}}),
    "every field": env(deadline=1767225700, reply_to="r", handler="h", meta={"k": 1}),
    "id one char": env(id="Z"),
    "id 128 chars": env(id="a" * 128),
    "id every allowed char": env(id=ID_CHARS),
    "id uuid": env(id=str(uuid.UUID(int=42))),
    "id like a key": env(id="order-1042:charge"),
    "key order and whitespace": '\n { "attempt" : 1 ,\t"submitted_at": 1, "payload": 0,'
    ' "id": "b" }\n',
    "unicode payload": env(payload="héllo ☃ \U0001f600"),
    "escaped unicode payload": raw_env(payload='"\\u00e9\\ud83d\\ude00"'),
}

INVALID = {
    "missing id": env(drop=("id",)),
    "missing payload": env(drop=("payload",)),
    "missing submitted_at": env(drop=("submitted_at",)),
    "missing attempt": env(drop=("attempt",)),
    "empty object": "{}",
    "only an id": '{"id": "x"}',
    "unknown field": env(priority=5),
    "field name in another case": env(Attempt=1),
    "empty text": "",
    "not JSON": "hello",
    "truncated JSON": env()[:-1],
    "trailing garbage": env() + " x",
    "JSON array": json.dumps([BASE]),
    "JSON string": json.dumps(env()),
    "JSON number": "1",
    "JSON null": "null",
    "id empty": env(id=""),
    "id 129 chars": env(id="a" * 129),
    "id with space": env(id="a b"),
    "id with slash": env(id="a/b"),
    "id with braces": env(id="{wire}"),
    "id with tab": env(id="a\tb"),
    "id with newline inside": env(id="a\nb"),
    "id non-ascii": env(id="café"),
    "id integer": env(id=12),
    "id null": env(id=None),
    "id list": env(id=["a"]),
    "submitted_at negative": env(submitted_at=-1),
    "submitted_at string": env(submitted_at="1767225600"),
    "submitted_at null": env(submitted_at=None),
    "submitted_at true": env(submitted_at=True),
    "submitted_at object": env(submitted_at={}),
    "submitted_at 1e400 (not a double)": raw_env(submitted_at="1e400"),
    "submitted_at NaN": raw_env(submitted_at="NaN"),
    "submitted_at Infinity": raw_env(submitted_at="Infinity"),
    "submitted_at -Infinity": raw_env(submitted_at="-Infinity"),
    "attempt 0": env(attempt=0),
    "attempt negative": env(attempt=-1),
    "attempt true": env(attempt=True),
    "attempt false": env(attempt=False),
    "attempt string": env(attempt="1"),
    "attempt fraction": env(attempt=1.5),
    "attempt null": env(attempt=None),
    "deadline negative": env(deadline=-0.5),
    "deadline string": env(deadline="soon"),
    "deadline true": env(deadline=True),
    "deadline list": env(deadline=[1]),
    "deadline NaN": raw_env(deadline="NaN"),
    "deadline Infinity": raw_env(deadline="Infinity"),
    "deadline 1e400": raw_env(deadline="1e400"),
    "reply_to empty": env(reply_to=""),
    "reply_to number": env(reply_to=5),
    "reply_to object": env(reply_to={}),
    "handler empty": env(handler=""),
    "handler number": env(handler=1),
    "handler list": env(handler=["http"]),
    "meta list": env(meta=[]),
    "meta string": env(meta="x"),
    "meta number": env(meta=1),
    "meta true": env(meta=True),
}

# Inputs that once split the schema and parse_envelope; kept as regressions.
VALID["attempt 1.0 (an integer to JSON Schema)"] = env(attempt=1.0)
INVALID.update(
    {
        "NaN inside payload": raw_env(payload='{"x": NaN}'),
        "Infinity inside meta": raw_env(meta='{"x": -Infinity}'),
        "submitted_at 10**400": raw_env(submitted_at="1" + "0" * 400),
        "deadline 10**400": raw_env(deadline="1" + "0" * 400),
        "attempt 10**400": raw_env(attempt="1" + "0" * 400),
        "attempt 1e309": raw_env(attempt="1e309"),
    }
)


def _cases(table: dict[str, str], expected: bool) -> list[Any]:
    return [pytest.param(raw, expected, id=name) for name, raw in table.items()]


@pytest.mark.unit
def test_the_schemas_are_valid_draft_2020_12() -> None:
    for name in (ENVELOPE_SCHEMA, RESULT_SCHEMA, DEAD_SCHEMA):
        schema = validator(name).schema
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == f"https://apipool.dev/schemas/{name}"
        assert schema["title"]
        assert schema["additionalProperties"] is False
        for prop, sub in schema["properties"].items():
            assert sub.get("description"), f"{name}: property {prop!r} has no description"
        assert set(schema["required"]) <= set(schema["properties"])


@pytest.mark.unit
@pytest.mark.parametrize(("raw", "expected"), _cases(VALID, True) + _cases(INVALID, False))
def test_schema_and_parse_envelope_agree(raw: str, expected: bool) -> None:
    assert schema_accepts(raw) is expected, "schema"
    assert parser_accepts(raw) is expected, "parse_envelope"


@pytest.mark.unit
def test_numbers_beyond_a_double_are_rejected_even_inside_the_payload() -> None:
    """Valid JSON text, but it cannot be written back (retries) without turning into inf."""
    assert not parser_accepts(raw_env(payload='{"x": 1e400}'))


@pytest.mark.unit
def test_id_with_a_trailing_newline_is_rejected() -> None:
    assert not parser_accepts(env(id="job-1\n"))


@pytest.mark.unit
def test_the_schema_lists_exactly_the_fields_parse_envelope_knows() -> None:
    from apipool.envelope import ENVELOPE_FIELDS, ID_PATTERN, REQUIRED_FIELDS

    schema = validator(ENVELOPE_SCHEMA).schema
    assert set(schema["properties"]) == ENVELOPE_FIELDS
    assert set(schema["required"]) == set(REQUIRED_FIELDS)
    assert schema["properties"]["id"]["pattern"] == ID_PATTERN.pattern


@pytest.mark.unit
def test_the_size_limit_is_on_the_bytes_of_the_envelope() -> None:
    limit = 1024
    filler = "é"  # two bytes in UTF-8: the limit counts bytes, not characters
    room = limit - len(env(payload="").encode())
    exact = env(payload=filler * (room // 2) + "x" * (room % 2))
    assert len(exact.encode()) == limit
    parse_envelope(exact, max_bytes=limit)
    parse_envelope(exact.encode(), max_bytes=limit)
    over = env(payload=filler * (room // 2) + "x" * (room % 2 + 1))
    with pytest.raises(EnvelopeError, match=f"over the limit of {limit} bytes"):
        parse_envelope(over, max_bytes=limit)
    assert schema_accepts(over)  # a schema cannot say it: the doc does
    assert defaults.MAX_ENVELOPE_BYTES == 1 << 20


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"deadline": 1767225660.5},
        {"job_id": "order-1042:charge", "handler": "http", "reply_to": "apipool:{p}:reply:1"},
        {"meta": {"trace": "t", "n": [1, 2]}, "now": 0},
        {"job_id": "a" * 128, "deadline": 0, "now": 1767225600},
    ],
)
@pytest.mark.parametrize("payload", [None, "text", 3, [1, {"a": None}], {"url": "https://x"}])
def test_make_envelope_output_matches_the_schema(kwargs: dict[str, Any], payload: Any) -> None:
    built = make_envelope(payload, **kwargs)
    for raw in (built.to_json(), built.next_attempt().to_json()):
        assert_valid(ENVELOPE_SCHEMA, strict_json(raw))
        assert parse_envelope(raw).payload == payload
    assert parse_envelope(built.to_json()) == built


RECORDS = {
    "ok": {"status": Outcome.OK, "result": {"echo": [1, "x"]}, "started_at": 1767225600.5},
    "ok, null result": {"status": Outcome.OK, "result": None, "started_at": 1767225600},
    "ok, http result": {
        "status": Outcome.OK,
        "result": {"status": 404, "headers": {"X": "y"}, "body": "not found"},
        "started_at": 1.0,
    },
    "expired": {"status": Outcome.EXPIRED, "error": "deadline passed before the call could start"},
    "dead": {"status": Outcome.DEAD, "error": "attempt 3 of 3 failed: RuntimeError: no"},
    "dead, malformed": {"status": Outcome.DEAD, "error": "malformed envelope: x", "attempt": 0},
}


@pytest.mark.unit
@pytest.mark.parametrize("fields", list(RECORDS.values()), ids=list(RECORDS))
def test_result_record_output_matches_the_schema(fields: dict[str, Any]) -> None:
    args: dict[str, Any] = {"job_id": "job-1", "attempt": 1, "slot": 2, **fields}
    doc = strict_json(result_record(**args))
    assert_valid(RESULT_SCHEMA, doc)
    assert (doc["id"], doc["status"], doc["slot"]) == ("job-1", fields["status"], 2)


@pytest.mark.unit
def test_the_result_schema_is_not_vacuous() -> None:
    good = strict_json(result_record(job_id="j", status=Outcome.OK, attempt=1, slot=0, result=1))
    assert validator(RESULT_SCHEMA).is_valid(good)
    for bad in (
        {**good, "status": "failed"},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "finished_at"},
        {**good, "status": Outcome.DEAD},  # dead needs an error and no result
        {**good, "error": "x"},  # ok has no error
    ):
        assert not validator(RESULT_SCHEMA).is_valid(bad), bad


@pytest.mark.unit
@pytest.mark.parametrize(
    ("job_id", "attempt", "raw"),
    [
        (None, None, '{"id": "x"}'),
        (None, None, "not json \ufffd"),
        ("job-1", 3, env(attempt=3)),
        ("job-1", 1, env()),
    ],
)
def test_dead_letter_entry_output_matches_the_schema(
    job_id: str | None, attempt: int | None, raw: str
) -> None:
    doc = strict_json(
        dead_letter_entry(raw=raw, reason="some reason", slot=1, job_id=job_id, attempt=attempt)
    )
    assert_valid(DEAD_SCHEMA, doc)
    assert doc["envelope"] == raw  # nothing to redact, nothing to cut
    assert doc["envelope_bytes"] == len(raw.encode())
    assert doc["envelope_sha1"] == hashlib.sha1(raw.encode()).hexdigest()
    assert not validator(DEAD_SCHEMA).is_valid({**doc, "reason": ""})
    assert not validator(DEAD_SCHEMA).is_valid({**doc, "attempt": 0})
    assert not validator(DEAD_SCHEMA).is_valid({**doc, "envelope_sha1": "ABC"})
    assert not validator(DEAD_SCHEMA).is_valid({k: v for k, v in doc.items() if k != "envelope"})


@pytest.mark.unit
def test_a_dead_letter_entry_is_cut_redacted_or_empty_and_still_matches_the_schema() -> None:
    long = env(payload={"url": "https://h/x?api_key=secret", "blob": "x" * 10_000})
    over = env(payload="y" * 200)
    for raw, max_bytes in ((long, defaults.MAX_ENVELOPE_BYTES), (over, 100)):
        doc = strict_json(
            dead_letter_entry(
                raw=raw, reason="r", slot=0, job_id=None, attempt=None, max_bytes=max_bytes
            )
        )
        assert_valid(DEAD_SCHEMA, doc)
        assert doc["envelope_bytes"] == len(raw.encode())
        assert doc["envelope"] is None or "secret" not in doc["envelope"]
        assert (
            doc["envelope"] is None or len(doc["envelope"]) == defaults.DEAD_LETTER_ENVELOPE_BYTES
        )
    assert doc["envelope"] is None  # over max_bytes: never read


def check_dead_letter_example(doc: dict[str, Any]) -> None:
    """A dead-letter example of the doc is what the pool writes for its envelope."""
    envelope = doc["envelope"]
    if envelope is None:  # over the size limit, written by TAKE inside Redis
        found = re.fullmatch(
            r"envelope of (\d+) bytes is over the limit of (\d+) bytes", doc["reason"]
        )
        assert found, doc["reason"]
        assert int(found.group(1)) == doc["envelope_bytes"] > int(found.group(2))
        assert doc["id"] is None
        assert doc["attempt"] is None
        return
    if "[redacted]" not in envelope:  # as taken: its size and hash are those of the text
        assert doc["envelope_bytes"] == len(envelope.encode())
        assert doc["envelope_sha1"] == hashlib.sha1(envelope.encode()).hexdigest()
    if doc["reason"].startswith("malformed envelope: "):
        with pytest.raises(EnvelopeError) as caught:
            parse_envelope(envelope)
        assert doc["reason"] == f"malformed envelope: {caught.value}"
    else:
        assert parse_envelope(envelope).attempt == doc["attempt"]


# -- the examples in docs/wire-format.md -----------------------------------------

MARKER = re.compile(r"<!-- example: ([a-z-]+) -->")
EXAMPLE = re.compile(r"<!-- example: ([a-z-]+) -->\n```[a-z]*\n(.*?)\n```", re.DOTALL)


def doc_examples() -> list[tuple[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    examples = EXAMPLE.findall(text)
    assert len(examples) == len(MARKER.findall(text)), "an example marker without a fence"
    return examples


def redis_cli_envelopes(session: str) -> list[str]:
    """The envelopes pushed by LPUSH and EVAL lines of a redis-cli session."""
    found = []
    for line in session.splitlines():
        if not line.startswith("$ redis-cli "):
            continue
        args = shlex.split(line[2:])[1:]
        command = args[0].upper()
        if command == "LPUSH":
            assert re.fullmatch(r"apipool:\{[a-z0-9-]+\}:queue", args[1]), line
            found += args[2:]
        elif command == "EVAL":
            keys = int(args[2])
            found += args[3 + keys :]
    return found


@pytest.mark.unit
def test_every_tagged_example_in_the_doc_is_valid() -> None:
    checked: dict[str, int] = {}
    for kind, body in doc_examples():
        checked[kind] = checked.get(kind, 0) + 1
        if kind == "envelope":
            assert_valid(ENVELOPE_SCHEMA, strict_json(body))
            parse_envelope(body)
        elif kind == "result-record":
            assert_valid(RESULT_SCHEMA, strict_json(body))
        elif kind == "dead-letter":
            doc = strict_json(body)
            assert_valid(DEAD_SCHEMA, doc)
            check_dead_letter_example(doc)
        elif kind == "http-payload":
            parse_http_request(strict_json(body))
        elif kind == "submit-script":
            assert body.strip() == SUBMIT.source.strip()
        elif kind == "redis-cli":
            envelopes = redis_cli_envelopes(body)
            assert envelopes
            for raw in envelopes:
                assert_valid(ENVELOPE_SCHEMA, strict_json(raw))
                parse_envelope(raw)
        else:
            pytest.fail(f"unknown example kind {kind!r} in {DOC.name}")
    expected = {"envelope", "result-record", "dead-letter", "http-payload", "submit-script"}
    assert expected | {"redis-cli"} == set(checked)


@pytest.mark.unit
def test_the_ruby_sketch_carries_the_submit_script_verbatim() -> None:
    text = DOC.read_text(encoding="utf-8")
    found = re.search(r"SUBMIT = <<~LUA\n(.*?)\n *LUA\n", text, re.DOTALL)
    assert found, "the Ruby sketch lost its SUBMIT heredoc"
    assert textwrap.dedent(found.group(1)).strip() == SUBMIT.source.strip()


@pytest.mark.unit
def test_the_doc_links_the_schema_files() -> None:
    text = DOC.read_text(encoding="utf-8")
    for name in (ENVELOPE_SCHEMA, RESULT_SCHEMA, DEAD_SCHEMA):
        link = f"(../operator/apipool/schemas/{name})"
        assert link in text
        assert (DOC.parent / link[1:-1]).resolve().is_file()


# -- a producer with raw Redis commands against a real slot ------------------------

POOL = "wire"
KEYS = PoolKeys(POOL)
RESULT_WAIT = 5  # seconds one BLMOVE blocks


@dataclass
class Slot:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def poll(predicate: Callable[[], Any], timeout: float, what: str, slot: Slot | None = None) -> Any:
    """wait_for, failing at once (with the slot's log) if the slot exits meanwhile."""

    def check() -> Any:
        if slot is not None and slot.proc.poll() is not None:
            pytest.fail(
                f"the slot exited with {slot.proc.returncode} while waiting for {what}:\n"
                + slot.output()
            )
        return predicate()

    try:
        return wait_for(check, timeout, what=what)
    except WaitTimeout as exc:
        log = f"\nslot log:\n{slot.output()}" if slot is not None else ""
        pytest.fail(f"{exc}{log}")


@pytest.fixture(scope="module")
def wire_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def wire_redis(wire_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(wire_server.url, socket_timeout=RESULT_WAIT + 5)
    yield client
    client.close()


@pytest.fixture(scope="module")
def wire_slot(
    wire_server: RedisServer, wire_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Slot]:
    log = tmp_path_factory.mktemp("wire-slot") / "slot.log"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "operator"), str(ROOT)]),
        PYTHONUNBUFFERED="1",
    )
    cmd = [
        sys.executable, "-m", "apipool", "slot",
        "--redis-url", wire_server.url,
        "--pool", POOL,
        "--slot", "0",
        "--handler", "tests.wire_handlers:echo",
        "--health-port", "0",
        "--call-timeout", "2",
        "--heartbeat-interval", "0.2",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    slot = Slot(proc, log)
    try:
        poll(lambda: wire_redis.exists(KEYS.lease(0)), 20, "the slot to take its lease", slot)
        yield slot
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def lpush(r: redis.Redis, raw: str) -> None:
    assert int(r.execute_command("LPUSH", KEYS.queue, raw)) >= 1


def read_result(r: redis.Redis, key: str, slot: Slot) -> bytes:
    """One blocking, non-consuming read, as docs/wire-format.md tells producers."""
    raw = r.execute_command("BLMOVE", key, key, "RIGHT", "RIGHT", RESULT_WAIT)
    if raw is None:
        pytest.fail(f"no result at {key} within {RESULT_WAIT} s; slot log:\n{slot.output()}")
    assert isinstance(raw, bytes)
    return raw


def counter(r: redis.Redis, name: str) -> int:
    return int(r.execute_command("HGET", KEYS.stats, name) or 0)


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_a_hand_written_envelope_is_answered_and_the_result_read_twice(
    wire_redis: redis.Redis, wire_slot: Slot
) -> None:
    job = f"ruby-{uuid.uuid4().hex[:8]}:echo"
    now = time.time()
    raw = (
        f'{{"id":"{job}","payload":{{"n":7,"s":"h\\u00e9llo","list":[1,null]}},'
        f'"submitted_at":{now:.3f},"attempt":1,"meta":{{"from":"resque"}}}}'
    )
    lpush(wire_redis, raw)
    key = f"apipool:{{{POOL}}}:result:{job}"
    first = read_result(wire_redis, key, wire_slot)
    second = read_result(wire_redis, key, wire_slot)
    assert first == second  # the read did not consume it
    assert int(wire_redis.execute_command("LLEN", key)) == 1
    assert 0 < int(wire_redis.execute_command("PTTL", key)) <= 3600 * 1000
    record = strict_json(first)
    assert_valid(RESULT_SCHEMA, record)
    assert record["status"] == "ok"
    assert record["error"] is None
    assert record["id"] == job
    assert record["attempt"] == 1
    assert record["slot"] == 0
    assert record["result"] == {
        "echo": {"n": 7, "s": "héllo", "list": [1, None]},
        "job": job,
        "attempt": 1,
    }
    assert now - 1 <= record["started_at"] <= record["finished_at"] <= time.time() + 1
    assert counter(wire_redis, "ok") >= 1
    assert wire_redis.execute_command("HGET", KEYS.stats, "submitted") is None  # plain LPUSH


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_a_malformed_envelope_is_dead_lettered_with_the_missing_fields(
    wire_redis: redis.Redis, wire_slot: Slot
) -> None:
    raw = '{"id": "x"}'
    lpush(wire_redis, raw)

    def entry() -> dict[str, Any] | None:
        for item in wire_redis.execute_command("LRANGE", KEYS.dead, 0, -1):
            doc = strict_json(item)
            if doc["envelope"] == raw:
                return dict(doc)
        return None

    dead = poll(entry, 15, "a dead-letter entry", wire_slot)
    assert_valid(DEAD_SCHEMA, dead)
    assert dead["id"] == "x"
    assert dead["attempt"] is None
    assert dead["slot"] == 0
    assert dead["reason"].startswith("malformed envelope: ")
    for field in ("payload", "submitted_at", "attempt"):
        assert field in dead["reason"]
    # The id was readable, so a waiter gets a "dead" record instead of a timeout.
    record = strict_json(read_result(wire_redis, KEYS.result("x"), wire_slot))
    assert_valid(RESULT_SCHEMA, record)
    assert record["status"] == "dead"
    assert record["attempt"] == 0
    assert record["error"] == dead["reason"]


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_an_envelope_past_its_deadline_expires_without_a_call(
    wire_redis: redis.Redis, wire_slot: Slot
) -> None:
    job = f"late-{uuid.uuid4().hex[:8]}"
    now = time.time()
    raw = (
        f'{{"id":"{job}","payload":"too late","submitted_at":{now - 120:.3f},'
        f'"attempt":1,"deadline":{now - 60:.3f}}}'
    )
    ok_before = counter(wire_redis, "ok")
    lpush(wire_redis, raw)
    record = strict_json(read_result(wire_redis, KEYS.result(job), wire_slot))
    assert_valid(RESULT_SCHEMA, record)
    assert record["status"] == "expired"
    assert record["result"] is None
    assert record["started_at"] is None
    assert "deadline" in record["error"]
    assert counter(wire_redis, "expired") >= 1
    assert counter(wire_redis, "ok") == ok_before


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_the_submit_script_from_the_doc_bounds_the_queue(wire_redis: redis.Redis) -> None:
    (script,) = [body for kind, body in doc_examples() if kind == "submit-script"]
    keys = PoolKeys("wire-bounded")  # no slot serves this pool: the queue only grows
    wire_redis.execute_command("HSET", keys.config, "max_queue_length", 2)

    def submit(*envelopes: str) -> int:
        args = [keys.queue, keys.config, keys.stats, *envelopes]
        return int(wire_redis.execute_command("EVAL", script, 3, *args))

    batch = [env(id=f"b-{i}") for i in range(3)]
    assert submit(*batch) == -1  # full: nothing queued, 0 waiting
    assert int(wire_redis.execute_command("LLEN", keys.queue)) == 0
    assert submit(*batch[:2]) == 2
    assert submit(batch[2]) == -3  # full: 2 waiting
    assert int(wire_redis.execute_command("HGET", keys.stats, "submitted")) == 2
    assert wire_redis.execute_command("LRANGE", keys.queue, 0, -1) == [
        batch[1].encode(),
        batch[0].encode(),
    ]  # taken from the right: b-0 first


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_the_slot_stops_with_exit_code_0_on_sigterm(
    wire_redis: redis.Redis, wire_slot: Slot
) -> None:
    wire_slot.proc.send_signal(signal.SIGTERM)
    try:
        code = wire_slot.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the slot did not stop within 20 s of SIGTERM:\n{wire_slot.output()}")
    assert code == 0, wire_slot.output()
    assert not wire_redis.exists(KEYS.lease(0))  # released, not left to expire
    assert int(wire_redis.execute_command("LLEN", KEYS.inflight(0))) == 0
