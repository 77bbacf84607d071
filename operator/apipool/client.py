"""The client general workers use to hand API work to a pool and wait for results.

It talks only to Redis (never to Kubernetes) and speaks the wire format of
docs/wire-format.md, so producers in other languages can do the same by hand.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisError

from . import defaults
from .envelope import make_envelope, parse_envelope
from .errors import (
    ConfigError,
    EnvelopeError,
    JobExpired,
    JobFailed,
    QueueFull,
    RedisUnavailable,
    ResultTimeout,
)
from .protocol import Outcome, PoolProtocol
from .settings import check_pool_name


def _int_or(value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(value) if isinstance(value, int) or value.is_integer() else default


def _time_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


@dataclass(frozen=True)
class JobResult:
    """A finished job as its result record describes it."""

    id: str
    status: str
    result: Any
    error: str | None
    attempt: int
    slot: int
    started_at: float | None
    finished_at: float | None

    @classmethod
    def from_json(cls, raw: str | bytes, job_id: str | None = None) -> JobResult:
        """Read a result record; JobFailed (``malformed result record: ...``)
        when it is not JSON, not an object, or lacks a string ``id`` or
        ``status``. Other fields of the wrong type read as absent."""
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise JobFailed(job_id or "?", f"malformed result record: not JSON: {exc}") from None
        if not isinstance(doc, dict):
            why = f"a JSON {type(doc).__name__}, not an object"
            raise JobFailed(job_id or "?", f"malformed result record: {why}")
        record_id, status = doc.get("id"), doc.get("status")
        if not isinstance(record_id, str) or not isinstance(status, str):
            why = "fields 'id' and 'status' must be strings"
            raise JobFailed(job_id or "?", f"malformed result record: {why}")
        error = doc.get("error")
        return cls(
            id=record_id,
            status=status,
            result=doc.get("result"),
            error=None if error is None else str(error),
            attempt=_int_or(doc.get("attempt"), 0),
            slot=_int_or(doc.get("slot"), -1),
            started_at=_time_or_none(doc.get("started_at")),
            finished_at=_time_or_none(doc.get("finished_at")),
        )

    def value(self) -> Any:
        """The handler's return value; raise JobFailed/JobExpired otherwise."""
        if self.status == Outcome.OK:
            return self.result
        if self.status == Outcome.EXPIRED:
            raise JobExpired(self.id, self.error or "deadline passed", self.attempt)
        if self.status == Outcome.DEAD:
            raise JobFailed(self.id, self.error or "dead-lettered", self.attempt)
        raise JobFailed(self.id, f"unknown result status {self.status!r}", self.attempt)


class Client:
    """Submit jobs to pool ``pool`` on ``redis_url`` and wait for their results."""

    def __init__(
        self,
        redis_url: str,
        pool: str,
        *,
        max_envelope_bytes: int = defaults.MAX_ENVELOPE_BYTES,
        socket_timeout: float = 5.0,
    ) -> None:
        self.pool = check_pool_name(pool)
        self.protocol = PoolProtocol(pool)
        self.keys = self.protocol.keys
        self.max_envelope_bytes = max_envelope_bytes
        self._socket_timeout = socket_timeout
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=socket_timeout)

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- submitting -------------------------------------------------------------

    def _encode(self, payload: Any, deadline: float | None, handler: str | None) -> tuple[str, str]:
        """The job id and envelope JSON; EnvelopeError for anything a slot would
        dead-letter as malformed (over the size limit, nested too deep, a value
        that is not JSON, a number beyond a double)."""
        env = make_envelope(payload, deadline=deadline, handler=handler)
        try:
            raw = env.to_json()
        except (TypeError, ValueError, RecursionError) as exc:
            raise EnvelopeError(f"payload is not JSON: {exc}") from exc
        parse_envelope(raw, max_bytes=self.max_envelope_bytes)
        return env.id, raw

    def _push(self, raws: list[str]) -> None:
        try:
            answer = self.protocol.submit(raws).run(self._redis)
        except RedisError as exc:
            raise RedisUnavailable(f"submitting to pool {self.pool!r} failed: {exc}") from exc
        if not answer.accepted:
            raise QueueFull(self.pool, depth=answer.depth, limit=self.max_queue_length())

    def submit(
        self, payload: Any, *, deadline: float | None = None, handler: str | None = None
    ) -> str:
        """Queue one job; return its id. ``deadline`` is a unix time after which
        the call is not worth making (the job is then answered ``expired``)."""
        job_id, raw = self._encode(payload, deadline, handler)
        self._push([raw])
        return job_id

    def submit_many(
        self,
        payloads: Iterable[Any],
        *,
        deadline: float | None = None,
        handler: str | None = None,
    ) -> list[str]:
        """Queue many jobs in one round trip, all or none (QueueFull). At most
        ``defaults.MAX_SUBMIT_BATCH`` payloads: a larger batch raises ConfigError
        before anything is queued (split it into several calls)."""
        batch = list(itertools.islice(payloads, defaults.MAX_SUBMIT_BATCH + 1))
        if len(batch) > defaults.MAX_SUBMIT_BATCH:
            raise ConfigError(
                f"submit_many takes at most {defaults.MAX_SUBMIT_BATCH} payloads in one "
                "batch (one Redis command); split the batch into several calls"
            )
        encoded = [self._encode(p, deadline, handler) for p in batch]
        if encoded:
            self._push([raw for _, raw in encoded])
        return [job_id for job_id, _ in encoded]

    # -- results ----------------------------------------------------------------

    def wait(self, job_id: str, timeout: float) -> JobResult:
        """Block until the job's result record exists; it stays for other readers.
        ResultTimeout when it does not appear in time; JobFailed when it is malformed."""
        key = self.keys.result(job_id)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResultTimeout(job_id, timeout)
            # Blocking rotation of a one-element list: reads without removing.
            block = min(left, max(self._socket_timeout - 1.0, 0.1))
            try:
                # a decimal timeout, which Redis >= 6 accepts (the stub says int)
                raw = self._redis.blmove(key, key, block, "RIGHT", "RIGHT")  # type: ignore[arg-type]
            except RedisError as exc:
                raise RedisUnavailable(f"waiting for job {job_id} failed: {exc}") from exc
            if raw is not None:
                return JobResult.from_json(raw, job_id)

    def result(self, job_id: str, timeout: float = 30.0) -> Any:
        """The handler's return value; raises ResultTimeout, JobFailed or JobExpired."""
        return self.wait(job_id, timeout).value()

    def call(
        self,
        payload: Any,
        timeout: float = 30.0,
        *,
        deadline: float | None = None,
        handler: str | None = None,
    ) -> Any:
        """Submit and wait: the handler's return value, or a typed error."""
        job_id = self.submit(payload, deadline=deadline, handler=handler)
        return self.result(job_id, timeout)

    # -- pool settings producers read ------------------------------------------

    def max_queue_length(self) -> int:
        try:
            value = self._redis.hget(self.keys.config, "max_queue_length")
        except RedisError as exc:
            raise RedisUnavailable(str(exc)) from exc
        return int(value or 0)
