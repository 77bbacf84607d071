"""The job envelope, the result record and the dead-letter entry (the wire format).

docs/wire-format.md documents these for producers in any language and
``schemas/job-envelope.schema.json`` is the JSON Schema of the envelope. The
validator here is hand-written for speed; a test keeps it in step with the
schema.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import defaults
from .errors import EnvelopeError
from .protocol import Outcome

ENVELOPE_FIELDS = frozenset(
    {"id", "payload", "submitted_at", "attempt", "deadline", "reply_to", "handler", "meta"}
)
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

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "id": self.id,
            "payload": self.payload,
            "submitted_at": self.submitted_at,
            "attempt": self.attempt,
        }
        for name in ("deadline", "reply_to", "handler", "meta"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        return json.dumps(doc, separators=(",", ":"), allow_nan=False)

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
        )

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


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a double
        return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


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


def parse_envelope(raw: str | bytes, *, max_bytes: int = defaults.MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse and validate a raw envelope; raise EnvelopeError with the reason."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise EnvelopeError(f"envelope of {size} bytes is over the limit of {max_bytes} bytes")
    try:
        doc = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise EnvelopeError(f"envelope is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError(f"envelope must be a JSON object, not {type(doc).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in doc]
    if missing:
        raise EnvelopeError(f"envelope lacks required field(s): {', '.join(missing)}")
    unknown = sorted(set(doc) - ENVELOPE_FIELDS)
    if unknown:
        raise EnvelopeError(
            f"envelope has unknown field(s): {', '.join(unknown)} (put free data in 'meta')"
        )
    attempt = doc["attempt"]
    if isinstance(attempt, float) and attempt.is_integer():
        attempt = int(attempt)  # JSON Schema counts 1.0 as an integer too
    env = Envelope(
        id=doc["id"],
        payload=doc["payload"],
        submitted_at=doc["submitted_at"],
        attempt=attempt,
        deadline=doc.get("deadline"),
        reply_to=doc.get("reply_to"),
        handler=doc.get("handler"),
        meta=doc.get("meta"),
    )
    _check_fields(env)
    return env


def salvage_id(raw: str | bytes) -> str | None:
    """The job id of an envelope that failed validation, when one can be read."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
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


def dead_letter_entry(
    *,
    raw: str,
    reason: str,
    slot: int,
    job_id: str | None,
    attempt: int | None,
    now: float | None = None,
) -> str:
    doc = {
        "id": job_id,
        "reason": reason,
        "slot": slot,
        "attempt": attempt,
        "failed_at": time.time() if now is None else now,
        "envelope": raw,
    }
    return json.dumps(doc, separators=(",", ":"))
