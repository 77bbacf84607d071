"""The job envelope, the result record and the dead-letter entry (the wire format).

docs/wire-format.md documents these for producers in any language and
``schemas/`` holds their JSON Schemas. The validator here is hand-written for
speed; a test keeps it in step with the schema.

Reading untrusted bytes is bounded before any parsing: the size is checked
first (an envelope over the limit is never parsed), then the nesting depth of
objects and arrays by a linear scan (strings stripped, brackets counted), and
only then ``json.loads`` runs, with NaN, Infinity and numbers beyond a double
refused. :func:`parse_envelope` raises nothing but :class:`EnvelopeError`;
:func:`salvage_id` and :func:`dead_letter_entry` raise nothing at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Any

from . import defaults
from .errors import EnvelopeError
from .protocol import Outcome
from .redact import redact_payload, redact_text

ENVELOPE_FIELDS = frozenset(
    {
        "id", "payload", "submitted_at", "attempt", "deadline", "reply_to", "handler", "meta",
        "not_before", "throttled",
    }
)  # fmt: skip
REQUIRED_FIELDS = ("id", "payload", "submitted_at", "attempt")
ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Envelope:
    """One job as it travels through Redis."""

    id: str
    payload: Any
    submitted_at: float
    attempt: int = 1
    deadline: float | None = None
    reply_to: str | None = None
    handler: str | None = None
    meta: dict[str, Any] | None = field(default=None)
    not_before: float | None = None
    """Unix time before which no slot calls it (the API said to wait: throttling.py)."""
    throttled: int = 0
    """Times the API answered it "slow down" (429); they cost no attempt."""

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "id": self.id,
            "payload": self.payload,
            "submitted_at": self.submitted_at,
            "attempt": self.attempt,
        }
        for name in ("deadline", "reply_to", "handler", "meta", "not_before"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        if self.throttled:
            doc["throttled"] = self.throttled
        # Unescaped text keeps a retried envelope the size the producer sent (an
        # escaped é is 6 bytes), unless it holds a lone surrogate, which UTF-8
        # cannot carry and only an escape can.
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        try:
            text.encode()
        except UnicodeEncodeError:
            text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
        return text

    def next_attempt(self) -> Envelope:
        return Envelope(
            id=self.id,
            payload=self.payload,
            submitted_at=self.submitted_at,
            attempt=self.attempt + 1,
            deadline=self.deadline,
            reply_to=self.reply_to,
            handler=self.handler,
            meta=self.meta,
            throttled=self.throttled,
        )

    def throttled_again(self, not_before: float) -> Envelope:
        """The same attempt again, not before ``not_before`` (the API said 429)."""
        return replace(self, not_before=round(not_before, 3), throttled=self.throttled + 1)

    def wait_before_call(self, now: float) -> float:
        """Seconds until the job may be called (0: now)."""
        return max(0.0, self.not_before - now) if self.not_before is not None else 0.0

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


def make_envelope(
    payload: Any,
    *,
    deadline: float | None = None,
    job_id: str | None = None,
    handler: str | None = None,
    reply_to: str | None = None,
    meta: dict[str, Any] | None = None,
    now: float | None = None,
) -> Envelope:
    """Build a first-attempt envelope; checks what a producer controls."""
    env = Envelope(
        id=job_id if job_id is not None else new_job_id(),
        payload=payload,
        submitted_at=time.time() if now is None else now,
        attempt=1,
        deadline=deadline,
        reply_to=reply_to,
        handler=handler,
        meta=meta,
    )
    _check_fields(env)
    return env


def _integral(value: Any) -> Any:
    """1.0 as 1 (JSON Schema counts 1.0 as an integer too); anything else as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a double
        return False


def _check_fields(env: Envelope) -> None:
    if not isinstance(env.id, str) or not ID_PATTERN.fullmatch(env.id):
        raise EnvelopeError("field 'id' must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    if not _is_number(env.submitted_at) or env.submitted_at < 0:
        raise EnvelopeError("field 'submitted_at' must be a non-negative unix time in seconds")
    if not isinstance(env.attempt, int) or isinstance(env.attempt, bool) or env.attempt < 1:
        raise EnvelopeError("field 'attempt' must be an integer >= 1")
    if env.deadline is not None and (not _is_number(env.deadline) or env.deadline < 0):
        raise EnvelopeError("field 'deadline' must be a unix time in seconds or null")
    for name in ("reply_to", "handler"):
        value = getattr(env, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise EnvelopeError(f"field {name!r} must be a non-empty string or null")
    if env.meta is not None and not isinstance(env.meta, dict):
        raise EnvelopeError("field 'meta' must be an object or null")
    if env.not_before is not None and (not _is_number(env.not_before) or env.not_before < 0):
        raise EnvelopeError("field 'not_before' must be a unix time in seconds or null")
    if not isinstance(env.throttled, int) or isinstance(env.throttled, bool) or env.throttled < 0:
        raise EnvelopeError("field 'throttled' must be an integer >= 0")


# -- reading untrusted JSON, bounded -------------------------------------------------

# A JSON string, or an unterminated one up to the end of the text: possessive, and
# matching from every opening quote, so one pass is linear whatever the input.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")
_BRACKET_STEP = tuple(1 if c in b"[{" else -1 for c in range(256))
_MAX_DOUBLE_INT = int(sys.float_info.max)
_MAX_INT_DIGITS = len(str(_MAX_DOUBLE_INT))
_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % _MAX_INT_DIGITS)


def _encoded(raw: str | bytes) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")


def json_depth(text: bytes) -> int:
    """How deep objects and arrays nest in JSON ``text`` (0 for a scalar), from
    its brackets outside strings; linear in the length, no recursion. Exact for
    valid JSON; for invalid JSON a figure json.loads would not go beyond."""
    brackets = _JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKET)
    opening = brackets.count(b"[") + brackets.count(b"{")
    if opening <= 1:
        return opening
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _double_range_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    value = int(text) if digits <= _MAX_INT_DIGITS else None
    if value is None or abs(value) > _MAX_DOUBLE_INT:
        raise ValueError(f"integer of {digits} digits is out of range (beyond a double)")
    return value


def load_json(
    raw: str | bytes,
    *,
    max_bytes: int,
    max_depth: int = defaults.MAX_JSON_DEPTH,
    strict: bool = True,
) -> Any:
    """Strict JSON of untrusted ``raw``, or EnvelopeError (never another error).

    Checked in this order, each before any parsing: at most ``max_bytes`` bytes,
    UTF-8, nesting of objects and arrays at most ``max_depth`` deep. NaN,
    Infinity and numbers a double cannot hold (``1e400``, a 400-digit integer)
    are refused, so what is read can be written back unchanged; ``strict=False``
    reads them anyway (as floats), for a look at a document that is refused."""
    data = _encoded(raw)
    if len(data) > max_bytes:
        raise EnvelopeError(f"envelope of {len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise EnvelopeError(
            f"envelope is not valid JSON: not UTF-8 (byte {data[exc.start]:#04x} at {exc.start})"
        ) from None
    depth = json_depth(data)
    if depth > max_depth:
        raise EnvelopeError(
            f"envelope nests objects and arrays {depth} deep, over the limit of {max_depth}"
        )
    long_ints = _LONG_DIGITS.search(data) is not None
    try:
        if not strict:
            return json.loads(text, parse_int=float if long_ints else int)
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_double_range_int if long_ints else int,
        )
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError(f"envelope is not valid JSON: {exc}") from None


def parse_envelope(raw: str | bytes, *, max_bytes: int = defaults.MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse and validate a raw envelope; raise EnvelopeError with the reason
    (and nothing else, whatever ``raw`` holds). Over ``max_bytes`` it is not parsed."""
    doc = load_json(raw, max_bytes=max_bytes)
    if not isinstance(doc, dict):
        raise EnvelopeError(f"envelope must be a JSON object, not {type(doc).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in doc]
    if missing:
        raise EnvelopeError(f"envelope lacks required field(s): {', '.join(missing)}")
    unknown = sorted(set(doc) - ENVELOPE_FIELDS)
    if unknown:
        names = ", ".join(unknown)
        if len(names) > 200:
            names = f"{names[:200]}... ({len(unknown)} in all)"
        raise EnvelopeError(f"envelope has unknown field(s): {names} (put free data in 'meta')")
    attempt = _integral(doc["attempt"])
    env = Envelope(
        id=doc["id"],
        payload=doc["payload"],
        submitted_at=doc["submitted_at"],
        attempt=attempt,
        deadline=doc.get("deadline"),
        reply_to=doc.get("reply_to"),
        handler=doc.get("handler"),
        meta=doc.get("meta"),
        not_before=doc.get("not_before"),
        throttled=_integral(doc.get("throttled", 0)),
    )
    _check_fields(env)
    return env


def salvage_id(raw: str | bytes, *, max_bytes: int) -> str | None:
    """The job id of an envelope that failed validation, when one can be read
    (also past a NaN or a number out of range); None for an envelope over
    ``max_bytes`` (never parsed) or nested too deep. Never raises."""
    try:
        doc = load_json(raw, max_bytes=max_bytes, strict=False)
    except EnvelopeError:
        return None
    if isinstance(doc, dict):
        job_id = doc.get("id")
        if isinstance(job_id, str) and ID_PATTERN.fullmatch(job_id):
            return job_id
    return None


def result_record(
    *,
    job_id: str,
    status: Outcome,
    attempt: int,
    slot: int,
    result: Any = None,
    error: str | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> str:
    """The JSON a waiter reads from the result key; TypeError or ValueError when
    ``result`` is not JSON (an object, NaN, ...)."""
    doc: dict[str, Any] = {
        "id": job_id,
        "status": status.value,
        "attempt": attempt,
        "slot": slot,
        "result": result,
        "error": error,
        "started_at": started_at,
        "finished_at": time.time() if finished_at is None else finished_at,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


# -- dead letters -------------------------------------------------------------------


def clip_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, never inside a character
    (a lone surrogate becomes ``?``)."""
    return text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")


def dead_letter_reason(reason: str, redact_headers: Iterable[str] = ()) -> str:
    """A reason fit for a dead letter and a result record: URLs and secret
    headers (``defaults.REDACT_HEADERS`` and ``redact_headers``) redacted, at most
    ``defaults.DEAD_LETTER_ENVELOPE_BYTES`` bytes of UTF-8, never empty. Never raises."""
    try:
        reason = redact_text(reason, redact_headers)
    except Exception:  # never let a dead letter fail; say nothing rather than a secret
        reason = "(reason withheld: it could not be redacted)"
    return clip_utf8(reason, defaults.DEAD_LETTER_ENVELOPE_BYTES) or "(no reason given)"


def dead_letter_envelope(
    raw: str | bytes, *, max_bytes: int, redact_headers: Iterable[str] = ()
) -> str | None:
    """What a dead letter keeps of envelope ``raw``, cut to
    ``defaults.DEAD_LETTER_ENVELOPE_BYTES`` bytes: None over ``max_bytes`` (never
    read, as TAKE does in Redis). A JSON object with a ``payload`` has that
    payload redacted by ``redact_payload`` (re-serialized compactly when that
    changed anything, else its text as taken); any other text (not JSON, not
    such an object) is redacted by ``redact_text``; both redact
    ``defaults.REDACT_HEADERS`` and ``redact_headers``. Invalid UTF-8 is replaced.
    Never raises: when redaction fails the body is dropped (None)."""
    data = _encoded(raw)
    if len(data) > max_bytes:
        return None
    try:
        doc = load_json(raw, max_bytes=max_bytes)
    except EnvelopeError:
        doc = None
    try:
        text = data.decode("utf-8", "replace")
        if isinstance(doc, dict) and "payload" in doc:
            payload = redact_payload(doc["payload"], redact_headers)
            if payload != doc["payload"]:
                text = json.dumps({**doc, "payload": payload}, separators=(",", ":"))
        else:
            text = redact_text(text, redact_headers)
        return clip_utf8(text, defaults.DEAD_LETTER_ENVELOPE_BYTES)
    except Exception:  # never let a dead letter fail; keep no body rather than a secret
        return None


def dead_letter_entry(
    *,
    raw: str | bytes,
    reason: str,
    slot: int,
    job_id: str | None,
    attempt: int | None,
    now: float | None = None,
    max_bytes: int = defaults.MAX_ENVELOPE_BYTES,
    redact_headers: Iterable[str] = (),
) -> str:
    """The JSON of one dead letter (schemas/dead-letter.schema.json), bounded and
    free of secrets: the reason by :func:`dead_letter_reason`, the envelope by
    :func:`dead_letter_envelope`, plus the envelope's size and SHA-1 (of its raw
    bytes, as TAKE writes them for an over-limit envelope). Never raises."""
    data = _encoded(raw)
    doc = {
        "id": job_id,
        "reason": dead_letter_reason(reason, redact_headers),
        "slot": slot,
        "attempt": attempt,
        "failed_at": time.time() if now is None else now,
        "envelope": dead_letter_envelope(raw, max_bytes=max_bytes, redact_headers=redact_headers),
        "envelope_bytes": len(data),
        "envelope_sha1": hashlib.sha1(data).hexdigest(),
    }
    return json.dumps(doc, separators=(",", ":"))
