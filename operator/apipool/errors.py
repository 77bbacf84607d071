"""Exceptions raised by apipool. Errors of Redis are converted at the boundary."""

from __future__ import annotations


class ApipoolError(Exception):
    """Base class of every error apipool raises on purpose."""


class ConfigError(ApipoolError):
    """A setting or argument is invalid; the message says which and why."""


class RedisUnavailable(ApipoolError):
    """Redis could not be reached or answered with an error."""


class QueueFull(ApipoolError):
    """The pool's queue is at its configured maximum length; nothing was queued."""

    def __init__(self, pool: str, depth: int, limit: int) -> None:
        super().__init__(f"queue of pool {pool!r} is full ({depth} queued, limit {limit})")
        self.pool = pool
        self.depth = depth
        self.limit = limit


class ResultTimeout(ApipoolError):
    """No result arrived within the time the caller was willing to wait."""

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(f"no result for job {job_id} within {timeout:g} s")
        self.job_id = job_id
        self.timeout = timeout


class JobFailed(ApipoolError):
    """The job was dead-lettered; ``reason`` is the dead-letter reason."""

    def __init__(self, job_id: str, reason: str, attempt: int | None = None) -> None:
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason
        self.attempt = attempt


class JobExpired(JobFailed):
    """The job's deadline passed before a slot could call the API for it."""


class EnvelopeError(ApipoolError):
    """A job envelope does not follow the wire format; the message is the reason."""


class PermanentError(Exception):
    """Raise from a handler when retrying cannot help (an invalid payload, a
    request the API will always refuse): the job is dead-lettered at once with
    this message instead of being called again up to ``max_attempts`` times."""


class RetryAfter(Exception):
    """Raise from a handler when the API said "slow down" (a 429, a quota):
    the job goes back to the head of the queue and keeps its attempt count.
    ``seconds``: how long the API asked to wait (its Retry-After); the whole pool
    then pauses that long (at most the slots' ``max_pause``). None: it did not
    say; this job waits a back-off that grows with each such answer, and the
    pool uses one slot fewer for a while (adaptive, docs/design.md)."""

    def __init__(self, seconds: float | None = None, message: str = "") -> None:
        if seconds is not None and not seconds >= 0:  # also refuses NaN
            raise ValueError(f"RetryAfter seconds must be >= 0 or None, got {seconds!r}")
        self.seconds = seconds
        said = "without Retry-After" if seconds is None else f"Retry-After {seconds:g} s"
        super().__init__(message or f"the API asked to slow down ({said})")
