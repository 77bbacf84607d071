"""One job a slot took, from its envelope to its one outcome.

Guarantees of :class:`JobRunner`:

- a job that cannot be called (malformed, a refused ``reply_to``, an unknown
  handler) is dead-lettered, one past its deadline is answered ``expired``;
  neither calls anything;
- self-fencing: a call starts only while the lease stays valid for
  ``call_timeout + fence_margin``; for a job taken before the lease was lost and
  won again, only if the job is still in our in-flight list (someone may have
  recovered it meanwhile); a stop while waiting hands the job back unrun;
- a call is bounded by ``call_timeout``; its outcome (ok, retried or dead) is
  written in one atomic step that may take the next job along;
- a sync handler that overran its timeout sets :attr:`JobRunner.overrun`: its
  thread cannot be stopped, so the process must exit;
- one bad job never stops the slot: an unforeseen error dead-letters that job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from redis.exceptions import RedisError

from .envelope import Envelope, parse_envelope, result_record
from .errors import EnvelopeError
from .handlers import Call, Handler
from .inflight import InFlight
from .lease import Lease
from .metrics import FailureCause, SlotMetrics
from .probes import CallTracker
from .protocol import Outcome
from .settings import SlotSettings

log = logging.getLogger("apipool.slot")


@dataclass(frozen=True)
class Attempt:
    """How one call went: a result record, or why it failed."""

    busy_ms: int
    record: str = ""
    failure: str | None = None
    cause: FailureCause = "error"
    """Failure cause for the metrics: ``error`` or ``timeout``."""


class JobRunner:
    def __init__(
        self,
        settings: SlotSettings,
        handlers: dict[str, Handler],
        *,
        lease: Lease,
        inflight: InFlight,
        calls: CallTracker,
        metrics: SlotMetrics,
        stopping: asyncio.Event,
        wait_lease_change: Callable[[float], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.timings = settings.timings
        self.proto = inflight.proto
        self.handlers = handlers
        self.lease = lease
        self.inflight = inflight
        self.calls = calls
        self.metrics = metrics
        self.stopping = stopping
        self.wait_lease_change = wait_lease_change
        self.overrun = False
        """A sync handler overran its timeout: the process must exit."""

    def may_take(self) -> bool:
        """Whether to take a job now (by a take or along with an outcome): not
        stopping, no overrun, and the lease leaves room for a blocking take
        followed by a whole call."""
        t = self.timings
        return (
            not self.stopping.is_set()
            and not self.overrun
            and self.lease.valid_for(t.call_timeout + t.fence_margin + t.take_block)
        )

    async def run(self, raw: bytes, epoch: int) -> None:
        """Take job ``raw`` (taken under lease ``epoch``) to its outcome."""
        try:
            await self._process(raw, epoch)
        except Exception as exc:  # a bug of ours or an input nobody foresaw
            log.exception("internal error on a job; dead-lettering it")
            self.metrics.outcome(Outcome.DEAD)
            reason = f"internal error handling this job: {exc!r}"
            await self.inflight.dead_letter(raw, reason, env=None)

    async def _process(self, raw: bytes, epoch: int) -> None:
        checked = await self._check(raw)
        if checked is None:
            return
        env, handler = checked
        if env.expired(time.time()):
            self.metrics.outcome(Outcome.EXPIRED)
            record = result_record(
                job_id=env.id,
                status=Outcome.EXPIRED,
                attempt=env.attempt,
                slot=self.settings.slot,
                error="deadline passed before the call could start",
            )
            await self.inflight.complete(
                raw,
                job_id=env.id,
                reply_to=env.reply_to,
                record=record,
                outcome=Outcome.EXPIRED,
                take_next=True,
            )
            return
        if await self.fence(raw, epoch):
            await self._settle(raw, env, await self._call(env, handler))

    async def _check(self, raw: bytes) -> tuple[Envelope, Handler] | None:
        """The envelope and its handler; None when the job was dead-lettered instead."""
        try:
            env = parse_envelope(raw, max_bytes=self.settings.limits.max_envelope_bytes)
        except EnvelopeError as exc:
            self.metrics.outcome(Outcome.DEAD, cause="malformed")
            reason = f"malformed envelope: {exc}"
            await self.inflight.dead_letter(raw, reason, env=None, take_next=True)
            return None
        problem = self.proto.reply_to_problem(env.reply_to)
        if problem:
            self.metrics.outcome(Outcome.DEAD, cause="malformed")
            reason = f"malformed envelope: {problem}"
            unanswerable = replace(env, reply_to=None)
            await self.inflight.dead_letter(raw, reason, env=unanswerable, take_next=True)
            return None
        handler = self.handlers.get(env.handler or "")
        if handler is None:
            known = ", ".join(sorted(name for name in self.handlers if name))
            self.metrics.outcome(Outcome.DEAD, cause="unknown handler")
            reason = f"unknown handler {env.handler!r}; this pool serves: {known}"
            await self.inflight.dead_letter(raw, reason, env=env, take_next=True)
            return None
        return env, handler

    async def fence(self, raw: bytes, epoch: int) -> bool:
        """Wait until the lease leaves room for a whole call; True: call job ``raw``
        now. False: it was handed back (stopping) or is no longer ours."""
        budget = self.timings.call_timeout + self.timings.fence_margin
        while True:
            if self.lease.valid_for(budget):
                if epoch == self.lease.epoch:
                    return True
                # The lease was lost and won again since the take: someone else
                # may have recovered this job meanwhile. Call it only if still ours.
                try:
                    still_ours = await self.inflight.holds(raw)
                except RedisError:
                    still_ours = False
                if still_ours:
                    return True
                log.warning("job taken before a lease loss is gone from in-flight; dropped here")
                return False
            if self.stopping.is_set():
                await self.inflight.hand_back(raw)
                return False
            await self.wait_lease_change(self.timings.heartbeat_interval)

    async def _call(self, env: Envelope, handler: Handler) -> Attempt:
        """Run the handler once, bounded by call_timeout."""
        s = self.settings
        timeout = self.timings.call_timeout
        call = Call(
            job_id=env.id,
            attempt=env.attempt,
            pool=s.pool,
            slot=s.slot,
            deadline=env.deadline,
            timeout=timeout,
        )
        started_wall = time.time()
        self.metrics.queue_wait.observe(max(0.0, started_wall - env.submitted_at))
        self.metrics.attempts.observe(env.attempt)
        self.metrics.busy.set(1)
        self.calls.start()
        try:
            async with asyncio.timeout(timeout):
                result = await handler.run(env.payload, call)
            record = result_record(
                job_id=env.id,
                status=Outcome.OK,
                attempt=env.attempt,
                slot=s.slot,
                result=result,
                started_at=started_wall,
            )
            return Attempt(busy_ms=self._end_call(), record=record)
        except TimeoutError:
            if not handler.is_async:
                self.overrun = True
            failure = f"call timed out after {timeout:g} s"
            return Attempt(busy_ms=self._end_call(), failure=failure, cause="timeout")
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            return Attempt(busy_ms=self._end_call(), failure=failure)
        finally:
            if self.calls.running:  # cancelled: the call is over all the same
                self._end_call()

    def _end_call(self) -> int:
        busy = self.calls.finish()
        self.metrics.busy.set(0)
        self.metrics.busy_seconds.inc(busy)
        return int(busy * 1000)

    async def _settle(self, raw: bytes, env: Envelope, attempt: Attempt) -> None:
        """Write the outcome of a call: ok, retried, or dead after the last attempt."""
        max_attempts = self.settings.max_attempts
        if attempt.failure is None:
            self.metrics.outcome(Outcome.OK)
            await self.inflight.complete(
                raw,
                job_id=env.id,
                reply_to=env.reply_to,
                record=attempt.record,
                outcome=Outcome.OK,
                busy_ms=attempt.busy_ms,
                take_next=True,
            )
        elif env.attempt >= max_attempts:
            self.metrics.outcome(Outcome.DEAD, cause=attempt.cause)
            reason = f"attempt {env.attempt} of {max_attempts} failed: {attempt.failure}"
            await self.inflight.dead_letter(
                raw, reason, env=env, busy_ms=attempt.busy_ms, take_next=True
            )
        else:
            self.metrics.outcome(Outcome.RETRIED, cause=attempt.cause)
            why = attempt.failure
            log.info("job %s attempt %d failed (%s); retrying", env.id, env.attempt, why)
            await self.inflight.retry(raw, env, take_next=True)
