"""What becomes of a job found in the in-flight list of a holder that is gone (pure).

The slot applies it at start to what its predecessor left; the operator applies
it to the in-flight lists of slots that no longer exist (scale-down, deleted pods).
Both run the :class:`~apipool.protocol.Step` that :func:`recovery_step` returns,
so a job is recovered by the same rule wherever its holder went.

Nothing here raises on any input: :func:`recover` and :func:`dead_letter` take
whatever bytes sit in an in-flight list. :func:`attempt_problem` is the rule a
slot also applies before a call: an attempt past ``max_attempts`` is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import defaults
from .envelope import (
    Envelope,
    dead_letter_entry,
    dead_letter_reason,
    parse_envelope,
    result_record,
    salvage_id,
)
from .errors import EnvelopeError
from .protocol import Finished, Outcome, PoolProtocol, Step


@dataclass(frozen=True)
class DeadLetter:
    """Everything COMPLETE needs to dead-letter one job."""

    job_id: str | None
    reason: str
    """The reason as written (redacted, bounded): in the entry and the result record."""
    reply_to: str | None
    record: str
    entry: str


@dataclass(frozen=True)
class Recovery:
    """What becomes of one job: exactly one of ``retry`` and ``dead`` is set."""

    env: Envelope | None
    retry: str | None
    """The envelope to queue again (attempt + 1), when the job has attempts left."""
    dead: DeadLetter | None

    def __post_init__(self) -> None:
        if (self.retry is None) == (self.dead is None):
            raise ValueError("a recovery is a retry or a dead letter, exactly one of them")


def attempt_problem(env: Envelope, max_attempts: int) -> str | None:
    """Why job ``env`` must not be called (its attempt is past the pool's
    ``max_attempts``: pushed so, or the limit was lowered), or None. The text is
    the dead-letter reason recovery writes for such a job; a slot checks this
    before a call and dead-letters the job with it."""
    if env.attempt > max_attempts:
        return f"attempt {env.attempt} is over the pool's max_attempts of {max_attempts}"
    return None


def dead_letter(
    raw: bytes,
    reason: str,
    *,
    env: Envelope | None,
    slot: int,
    max_bytes: int = defaults.MAX_ENVELOPE_BYTES,
    redact_headers: Iterable[str] = (),
) -> DeadLetter:
    """The dead letter of job ``raw``, for any bytes whatever (it never raises).

    ``env`` is the parsed envelope when there is one; without it the job id is
    salvaged from ``raw`` unless ``raw`` is over ``max_bytes`` (never parsed).
    The reason is redacted and bounded; the entry keeps a redacted, truncated
    envelope with its size and SHA-1 (see :func:`~apipool.envelope.dead_letter_entry`);
    ``redact_headers`` names headers to redact besides ``defaults.REDACT_HEADERS``.
    The result record goes to the job's result key only when its id is known."""
    job_id = env.id if env else salvage_id(raw, max_bytes=max_bytes)
    attempt = env.attempt if env else None
    written = dead_letter_reason(reason, redact_headers)  # as dead_letter_entry writes it
    return DeadLetter(
        job_id=job_id,
        reason=written,
        reply_to=env.reply_to if env else None,
        record=result_record(
            job_id=job_id or "", status=Outcome.DEAD, attempt=attempt or 0, slot=slot, error=written
        ),
        entry=dead_letter_entry(
            raw=raw,
            reason=reason,
            slot=slot,
            job_id=job_id,
            attempt=attempt,
            max_bytes=max_bytes,
            redact_headers=redact_headers,
        ),
    )


def dead_letter_step(
    proto: PoolProtocol,
    slot: int,
    raw: bytes,
    dead: DeadLetter,
    *,
    ttl_ms: int,
    busy_ms: int = 0,
    take_next: bool = False,
) -> Step[Finished]:
    """The COMPLETE step that writes ``dead`` as the job's one outcome."""
    return proto.complete(
        slot,
        raw,
        result_key=proto.result_key(dead.job_id, dead.reply_to),
        record=dead.record,
        ttl_ms=ttl_ms,
        outcome=Outcome.DEAD,
        busy_ms=busy_ms,
        dead_entry=dead.entry,
        take_next=take_next,
    )


def recover(
    raw: bytes,
    *,
    proto: PoolProtocol,
    slot: int,
    max_attempts: int,
    max_bytes: int,
    why: str,
    redact_headers: Iterable[str] = (),
) -> Recovery:
    """Retry a job whose holder is gone (it may have called the API, so that
    costs an attempt), or dead-letter it: after its last attempt, when its
    attempt is already past ``max_attempts``, when it is malformed (over
    ``max_bytes``: never parsed), or when its next attempt would not fit
    ``max_bytes``. ``why`` says how the holder went, e.g. ``slot died`` or
    ``slot removed``. A dead letter is redacted as :func:`dead_letter` says.
    Never raises, whatever ``raw`` holds."""

    def dead(reason: str, env: Envelope | None) -> Recovery:
        letter = dead_letter(
            raw, reason, env=env, slot=slot, max_bytes=max_bytes, redact_headers=redact_headers
        )
        return Recovery(env, None, letter)

    try:
        env = parse_envelope(raw, max_bytes=max_bytes)
        problem = proto.reply_to_problem(env.reply_to)
        if problem:
            raise EnvelopeError(problem)
    except EnvelopeError as exc:
        return dead(f"malformed envelope: {exc}", None)
    over = attempt_problem(env, max_attempts)
    if over:
        return dead(over, env)
    if env.attempt >= max_attempts:
        return dead(f"{why} during attempt {env.attempt} of {max_attempts}", env)
    try:
        retry = env.next_attempt().to_json()
    except (TypeError, ValueError, RecursionError) as exc:  # not expected of a parsed envelope
        return dead(f"{why} during attempt {env.attempt}; cannot write it back: {exc}", env)
    size = len(retry.encode())
    if size > max_bytes:
        return dead(
            f"{why} during attempt {env.attempt}; its next envelope of {size} bytes "
            f"is over the limit of {max_bytes} bytes",
            env,
        )
    return Recovery(env, retry, None)


def recovery_step(
    proto: PoolProtocol, slot: int, raw: bytes, recovery: Recovery, *, ttl_ms: int
) -> Step[Finished]:
    """The step that applies ``recovery`` to ``raw`` in slot ``slot``'s in-flight list."""
    if recovery.retry is not None:
        return proto.requeue(slot, raw, recovery.retry, front=True, outcome=Outcome.RECOVERED)
    assert recovery.dead is not None
    return dead_letter_step(proto, slot, raw, recovery.dead, ttl_ms=ttl_ms)
