"""What becomes of a job found in the in-flight list of a holder that is gone (pure).

The slot applies it at start to what its predecessor left; the operator applies
it to the in-flight lists of slots that no longer exist (scale-down, deleted pods).
Both run the :class:`~apipool.protocol.Step` that :func:`recovery_step` returns,
so a job is recovered by the same rule wherever its holder went.
"""

from __future__ import annotations

from dataclasses import dataclass

from .envelope import (
    Envelope,
    dead_letter_entry,
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
    reply_to: str | None
    record: str
    entry: str


@dataclass(frozen=True)
class Recovery:
    env: Envelope | None
    retry: str | None
    """The envelope to queue again (attempt + 1), when the job has attempts left."""
    dead: DeadLetter | None


def dead_letter(raw: bytes, reason: str, *, env: Envelope | None, slot: int) -> DeadLetter:
    job_id = env.id if env else salvage_id(raw)
    attempt = env.attempt if env else None
    return DeadLetter(
        job_id=job_id,
        reason=reason,
        reply_to=env.reply_to if env else None,
        record=result_record(
            job_id=job_id or "", status=Outcome.DEAD, attempt=attempt or 0, slot=slot, error=reason
        ),
        entry=dead_letter_entry(
            raw=raw.decode(errors="replace"),
            reason=reason,
            slot=slot,
            job_id=job_id,
            attempt=attempt,
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
    raw: bytes, *, proto: PoolProtocol, slot: int, max_attempts: int, max_bytes: int, why: str
) -> Recovery:
    """Retry a job whose holder is gone (it may have called the API, so that
    costs an attempt), or dead-letter it after its last attempt. ``why`` says
    how the holder went, e.g. ``slot died`` or ``slot removed``."""
    try:
        env = parse_envelope(raw, max_bytes=max_bytes)
        problem = proto.reply_to_problem(env.reply_to)
        if problem:
            raise EnvelopeError(problem)
        retry = env.next_attempt().to_json()
    except (EnvelopeError, ValueError) as exc:
        return Recovery(
            None, None, dead_letter(raw, f"malformed envelope: {exc}", env=None, slot=slot)
        )
    if env.attempt >= max_attempts:
        reason = f"{why} during attempt {env.attempt} of {max_attempts}"
        return Recovery(env, None, dead_letter(raw, reason, env=env, slot=slot))
    return Recovery(env, retry, None)


def recovery_step(
    proto: PoolProtocol, slot: int, raw: bytes, recovery: Recovery, *, ttl_ms: int
) -> Step[Finished]:
    """The step that applies ``recovery`` to ``raw`` in slot ``slot``'s in-flight list."""
    if recovery.retry is not None:
        return proto.requeue(slot, raw, recovery.retry, front=True, outcome=Outcome.RECOVERED)
    assert recovery.dead is not None
    return dead_letter_step(proto, slot, raw, recovery.dead, ttl_ms=ttl_ms)
