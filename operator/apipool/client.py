"""The client general workers use to hand API work to a pool and wait for results.

It talks only to Redis (never to Kubernetes) and speaks the wire format of
docs/wire-format.md, so producers in other languages can do the same by hand.

A :class:`Client` is fork-safe: one made before ``os.fork()`` (an RQ worker
before its work horse, Celery's prefork parent) may be used in the parent and
in every child. redis-py's connection pool notices the new process id and opens
the child's own connections, never sharing the parent's sockets; the client's
own lock is made anew in the child the same way. It is thread-safe as redis-py
is. See docs/integrations.md.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisError

from . import defaults, layout
from .envelope import ID_PATTERN, make_envelope, parse_envelope
from .errors import (
    ConfigError,
    EnvelopeError,
    JobExpired,
    JobFailed,
    QueueFull,
    RedisUnavailable,
    ResultTimeout,
)
from .protocol import CancelCode, Outcome, PoolProtocol
from .settings import check_pool_name

log = logging.getLogger("apipool.client")

REMEMBER_JOBS = 10_000
"""The most envelopes a client remembers for :meth:`Client.cancel` (the newest)."""
REMEMBER_BYTES = 16 * 1024 * 1024
"""The most bytes of envelopes it remembers; the oldest are forgotten first."""


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


class _Sent:
    """The envelopes this process submitted, newest last, bounded by count and bytes:
    :meth:`Client.cancel` removes one of them by its exact bytes (``LREM``)."""

    def __init__(self, max_jobs: int, max_bytes: int) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self._envelopes: OrderedDict[str, str] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _locked(self) -> threading.Lock:
        if self._pid != os.getpid():  # a forked child: the parent's lock may be held
            self._pid, self._lock = os.getpid(), threading.Lock()
        return self._lock

    def add(self, job_id: str, raw: str) -> None:
        if len(raw) > self.max_bytes or self.max_jobs <= 0:
            return
        with self._locked():
            old = self._envelopes.pop(job_id, None)
            self._bytes += len(raw) - (len(old) if old is not None else 0)
            self._envelopes[job_id] = raw
            while len(self._envelopes) > self.max_jobs or self._bytes > self.max_bytes:
                _, dropped = self._envelopes.popitem(last=False)
                self._bytes -= len(dropped)

    def get(self, job_id: str) -> str:
        with self._locked():
            return self._envelopes.get(job_id, "")

    def forget(self, job_id: str) -> None:
        with self._locked():
            raw = self._envelopes.pop(job_id, None)
            if raw is not None:
                self._bytes -= len(raw)

    def __len__(self) -> int:
        return len(self._envelopes)


class Client:
    """Submit jobs to pool ``pool`` on ``redis_url`` and wait for their results.

    ``remember_jobs`` / ``remember_bytes`` bound the envelopes kept for
    :meth:`cancel` (0 jobs: keep none; cancel then always scans the queue)."""

    def __init__(
        self,
        redis_url: str,
        pool: str,
        *,
        max_envelope_bytes: int = defaults.MAX_ENVELOPE_BYTES,
        socket_timeout: float = 5.0,
        remember_jobs: int = REMEMBER_JOBS,
        remember_bytes: int = REMEMBER_BYTES,
    ) -> None:
        self.pool = check_pool_name(pool)
        self.protocol = PoolProtocol(pool)
        self.keys = self.protocol.keys
        self.max_envelope_bytes = max_envelope_bytes
        self._socket_timeout = socket_timeout
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=socket_timeout)
        self._sent = _Sent(remember_jobs, remember_bytes)
        self._unread_refused = False

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

    def _push(self, encoded: list[tuple[str, str]]) -> None:
        try:
            answer = self.protocol.submit([raw for _, raw in encoded]).run(self._redis)
        except RedisError as exc:
            raise RedisUnavailable(f"submitting to pool {self.pool!r} failed: {exc}") from exc
        if not answer.accepted:
            raise QueueFull(self.pool, depth=answer.depth, limit=self.max_queue_length())
        for job_id, raw in encoded:
            self._sent.add(job_id, raw)

    def submit(
        self, payload: Any, *, deadline: float | None = None, handler: str | None = None
    ) -> str:
        """Queue one job; return its id. ``deadline`` is a unix time after which
        the call is not worth making (the job is then answered ``expired``)."""
        job_id, raw = self._encode(payload, deadline, handler)
        self._push([(job_id, raw)])
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
            self._push(encoded)
        return [job_id for job_id, _ in encoded]

    # -- results ----------------------------------------------------------------

    def wait(self, job_id: str, timeout: float) -> JobResult:
        """Block until the job's result record exists; it stays for other readers.
        ResultTimeout when it does not appear in time; JobFailed when it is malformed.
        Reading it takes the job off the pool's unread set (it is not counted
        ``expired_unread``)."""
        key = self.keys.result(job_id)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResultTimeout(job_id, timeout)
            # Blocking rotation of a one-element list: reads without removing;
            # then, in the same round trip, ZREM from the unread set (a no-op
            # while there is no record: COMPLETE adds the id with the record).
            block = min(left, max(self._socket_timeout - 1.0, 0.1))
            pipe = self._redis.pipeline(transaction=False)
            # a decimal timeout, which Redis >= 6 accepts (the stub says int)
            pipe.blmove(key, key, block, "RIGHT", "RIGHT")  # type: ignore[arg-type]
            pipe.zrem(self.keys.unread, job_id)
            try:
                raw, unread = pipe.execute(raise_on_error=False)
            except RedisError as exc:
                raise RedisUnavailable(f"waiting for job {job_id} failed: {exc}") from exc
            if isinstance(raw, RedisError):
                raise RedisUnavailable(f"waiting for job {job_id} failed: {raw}") from raw
            if isinstance(unread, RedisError) and not self._unread_refused:
                self._unread_refused = True  # the read itself worked: do not fail it
                log.warning(
                    "pool %r: results read here are counted as expired unread, Redis "
                    "refused ZREM on %s: %s (see the producer's ACL in docs/operations.md)",
                    self.pool,
                    self.keys.unread,
                    unread,
                )
            if raw is not None:
                self._sent.forget(job_id)
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

    # -- calls nobody waits for ------------------------------------------------

    def cancel(self, job_id: str, *, scan: int = layout.CANCEL_SCAN) -> bool:
        """Remove job ``job_id`` from the queue before a slot takes it: True when
        removed (no slot will call it, no result record is written: a waiter
        elsewhere times out), False when it is not in the queue (a slot took it,
        it is done, or it is unknown), atomically (CANCEL in layout.py).

        A job this client submitted (one of its newest ``remember_jobs``) is found
        by its exact envelope wherever it is in the queue. Any other (another
        process submitted it, or it waits for a retry) is looked for among the
        ``scan`` envelopes nearest the end slots take from: Redis reads up to
        that many, decoding only those that contain the id. An id no envelope
        may carry (see the envelope's id rule) is never in the queue: False,
        without asking Redis."""
        if not isinstance(job_id, str) or not ID_PATTERN.fullmatch(job_id):
            return False
        step = self.protocol.cancel(job_id, self._sent.get(job_id), scan=scan)
        try:
            code = step.run(self._redis)
        except RedisError as exc:
            raise RedisUnavailable(f"cancelling job {job_id} failed: {exc}") from exc
        if code == CancelCode.BEYOND_SCAN:
            log.debug("job %s not among the %d envelopes next in line", job_id, scan)
        self._sent.forget(job_id)
        return code == CancelCode.REMOVED

    # -- pool settings producers read ------------------------------------------

    def max_queue_length(self) -> int:
        try:
            value = self._redis.hget(self.keys.config, "max_queue_length")
        except RedisError as exc:
            raise RedisUnavailable(str(exc)) from exc
        return int(value or 0)
