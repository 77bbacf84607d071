"""The client general workers use to hand API work to a pool and wait for results.

It talks only to Redis (never to Kubernetes) and speaks the wire format of
docs/wire-format.md, so producers in other languages can do the same by hand.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisError

from . import defaults
from .envelope import make_envelope
from .errors import (
    EnvelopeError,
    JobExpired,
    JobFailed,
    QueueFull,
    RedisUnavailable,
    ResultTimeout,
)
from .protocol import Outcome, PoolProtocol
from .settings import check_pool_name


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
    def from_json(cls, raw: str | bytes) -> JobResult:
        doc = json.loads(raw)
        return cls(
            id=doc["id"],
            status=doc["status"],
            result=doc.get("result"),
            error=doc.get("error"),
            attempt=int(doc.get("attempt") or 0),
            slot=int(doc.get("slot") if doc.get("slot") is not None else -1),
            started_at=doc.get("started_at"),
            finished_at=doc.get("finished_at"),
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
        env = make_envelope(payload, deadline=deadline, handler=handler)
        raw = env.to_json()
        if len(raw.encode()) > self.max_envelope_bytes:
            raise EnvelopeError(
                f"envelope of {len(raw.encode())} bytes is over the limit of "
                f"{self.max_envelope_bytes} bytes"
            )
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
        """Queue many jobs in one round trip, all or none (QueueFull)."""
        encoded = [self._encode(p, deadline, handler) for p in payloads]
        if encoded:
            self._push([raw for _, raw in encoded])
        return [job_id for job_id, _ in encoded]

    # -- results ----------------------------------------------------------------

    def wait(self, job_id: str, timeout: float) -> JobResult:
        """Block until the job's result record exists; it stays for other readers."""
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
                return JobResult.from_json(raw)

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
