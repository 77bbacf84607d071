"""One job a slot took, from its envelope to its one outcome.

Guarantees of :class:`JobRunner`:

- a job that cannot be called (malformed, a refused ``reply_to``, an attempt
  past ``max_attempts``, an unknown handler, a result key or ``reply_to`` that
  holds something other than a list, read with ``TYPE`` before the call) is
  dead-lettered, one past its deadline is answered ``expired``; neither calls
  anything;
- self-fencing: a call starts only while the lease stays valid for
  ``call_timeout + fence_margin``; for a job taken before the lease was lost and
  won again, only if the job is still in our in-flight list (someone may have
  recovered it meanwhile); a stop while waiting hands the job back unrun, and
  so does a lease a renewal found gone (the next owner shares the list);
- a call is bounded by ``call_timeout``; its outcome (ok, retried or dead) is
  written in one atomic step that may take the next job along;
- what retrying cannot mend is dead-lettered after one call: a
  :class:`~apipool.errors.PermanentError`, a ``BaseException`` of the handler
  (``SystemExit``, ``KeyboardInterrupt``, ...: the slot carries on; only a stop's
  ``CancelledError`` goes through), a result that is not JSON or whose JSON is
  over ``max_result_bytes``;
- failure texts are redacted (``redact.redact_text``) before they are logged or
  stored;
- a sync handler that overran its timeout sets :attr:`JobRunner.overrun`: its
  thread cannot be stopped, so the process must exit;
- one bad job never stops the slot: an unforeseen error dead-letters that job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from redis.exceptions import RedisError

from . import defaults
from .envelope import Envelope, parse_envelope, result_record
from .errors import EnvelopeError, PermanentError, RetryAfter
from .handlers import Call, Handler
from .inflight import InFlight
from .lease import Lease
from .metrics import FailureCause, SlotMetrics
from .probes import CallTracker
from .protocol import FinishCode, Outcome, Signals
from .recovery import attempt_problem
from .redis_checks import exception_text
from .settings import SlotSettings
from .throttling import PoolSignals, backoff
from .waiting import wait_event

log = logging.getLogger("apipool.slot")

PARKED_LOOK = 0.25
"""Seconds between two looks of a parked slot at the pool's effective concurrency."""
HOLD_LOOK = 1.0
"""Seconds a held job waits before the slot looks at the pool's pause again."""


@dataclass(frozen=True)
class Attempt:
    """How one call went: a result record, or why it failed."""

    busy_ms: int
    record: str = ""
    failure: str | None = None
    cause: FailureCause = "error"
    """Failure cause for the metrics: ``error``, ``timeout``, ``permanent``, ``bad result``."""
    permanent: bool = False
    """Retrying cannot help: dead-letter the job now, whatever attempts are left."""
    throttled: bool = False
    """The API said "slow down": not a failed attempt (throttling.py)."""
    retry_after: float | None = None
    """With ``throttled``: the seconds it asked to wait, if it said."""


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
        held_back: Callable[[], AbstractContextManager[object]] = nullcontext,
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
        self.held_back = held_back
        """Entered while a job waits for a pause or its not_before (slot time)."""
        self.signals = PoolSignals(settings.slot)
        """The pool's pause and effective concurrency, as last heard."""
        self._known_kind: tuple[bytes, str, str] | None = None
        """(job, its result key, what that key held), read during the previous call."""

    def may_take(self) -> bool:
        """Whether to take a job now (by a take or along with an outcome): not
        stopping, no overrun, and the lease leaves room for a blocking take
        followed by a whole call."""
        t = self.timings
        return (
            not self.stopping.is_set()
            and not self.overrun
            and not self.signals.parked
            and self.lease.valid_for(t.call_timeout + t.fence_margin + t.take_block)
        )

    @property
    def parked(self) -> bool:
        """Above the pool's effective concurrency: no take, no call."""
        return self.signals.parked

    async def refresh_signals(self, *, force: bool = False) -> None:
        """Read the pool's pause and effective concurrency (SIGNALS), at most every
        SIGNALS_EVERY seconds unless ``force``; with adaptation, this read is also
        what raises the effective concurrency again. A Redis error: next time."""
        mono = time.monotonic()
        if not force and not self.signals.due(mono):
            return
        self.signals.read_at = mono
        s = self.settings
        step = self.proto.signals(
            adapt=s.adaptive,
            probe_ms=int(defaults.PROBE_INTERVAL * 1000),
            now_ms=int(time.time() * 1000),
        )
        try:
            answer = await step.arun(self.inflight.r)
        except RedisError:
            return
        self._heard(answer)

    async def wait_unparked(self) -> None:
        """While parked: look at the signals again every PARKED_LOOK seconds, for
        at most one heartbeat interval (or until a stop)."""
        end = time.monotonic() + self.timings.heartbeat_interval
        while self.signals.parked and not self.stopping.is_set() and time.monotonic() < end:
            await wait_event(self.stopping, PARKED_LOOK)
            await self.refresh_signals(force=True)

    def _heard(self, answer: Signals) -> None:
        was_parked = self.signals.parked
        self.signals.heard(answer)
        self.metrics.effective_slots.set(self.signals.effective)
        self.metrics.parked.set(1 if self.signals.parked else 0)
        self.metrics.pause_remaining.set(self.signals.pause_left())
        if self.signals.parked != was_parked:
            state = "parked" if self.signals.parked else "back in use"
            log.info("slot %d: %s (the pool's effective concurrency is %d)",
                     self.settings.slot, state, self.signals.effective)  # fmt: skip

    async def run(self, raw: bytes, epoch: int) -> None:
        """Take job ``raw`` (taken under lease ``epoch``) to its outcome."""
        try:
            await self._process(raw, epoch)
        except Exception as exc:  # a bug of ours or an input nobody foresaw
            log.exception("internal error on a job; dead-lettering it")
            self.metrics.outcome(Outcome.DEAD)
            reason = f"internal error handling this job: {self._text(exc)}"
            await self.inflight.dead_letter(raw, reason, env=None)

    def _text(self, exc: BaseException) -> str:
        """``Type: message`` of ``exc``, redacted and cut short."""
        return exception_text(exc, self.settings.http.redact_headers)

    async def _process(self, raw: bytes, epoch: int) -> None:
        checked = await self._check(raw)
        if checked is None:
            return
        env, handler = checked
        if env.expired(time.time()):
            await self._expire(raw, env, "deadline passed before the call could start")
            return
        if (
            await self._answerable(raw, env)
            and await self._hold(raw, env)
            and await self.fence(raw, epoch)
        ):
            await self._settle(raw, env, await self._call(env, handler))

    async def _expire(self, raw: bytes, env: Envelope, why: str) -> None:
        """Answer the job ``expired``: its deadline passed (or will) before a call."""
        self.metrics.outcome(Outcome.EXPIRED)
        record = result_record(
            job_id=env.id,
            status=Outcome.EXPIRED,
            attempt=env.attempt,
            slot=self.settings.slot,
            error=why,
        )
        await self.inflight.complete(
            raw,
            job_id=env.id,
            reply_to=env.reply_to,
            record=record,
            outcome=Outcome.EXPIRED,
            take_next=True,
        )

    async def _hold(self, raw: bytes, env: Envelope) -> bool:
        """Honour what the API said before calling: a parked slot hands the job
        back; a job waits out the pool's pause and its own ``not_before`` (seeing
        a pause that grows meanwhile), unless its deadline passes first: then it
        is expired at once. True: call it now. A stop hands it back."""
        while True:
            if self.signals.parked:
                await self.inflight.hand_back(raw)  # for a slot still in use
                return False
            now = time.time()
            wait = max(self.signals.pause_left(now), env.wait_before_call(now))
            if wait <= 0:
                return True
            if env.deadline is not None and env.deadline <= now + wait:
                await self._expire(raw, env, "deadline passes before the API takes calls again")
                return False
            with self.held_back():
                await wait_event(self.stopping, min(wait, HOLD_LOOK))
            if self.stopping.is_set():
                await self.inflight.hand_back(raw)
                return False
            await self.refresh_signals()

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
        problem = attempt_problem(env, self.settings.max_attempts)
        if problem:
            self.metrics.outcome(Outcome.DEAD, cause="malformed")
            await self.inflight.dead_letter(raw, problem, env=env, take_next=True)
            return None
        handler = self.handlers.get(env.handler or "")
        if handler is None:
            known = ", ".join(sorted(name for name in self.handlers if name))
            self.metrics.outcome(Outcome.DEAD, cause="unknown handler")
            reason = f"unknown handler {env.handler!r}; this pool serves: {known}"
            await self.inflight.dead_letter(raw, reason, env=env, take_next=True)
            return None
        return env, handler

    async def _answerable(self, raw: bytes, env: Envelope) -> bool:
        """Whether the job's result can go where it is to go, read before the call
        (a paid call whose outcome cannot be written would be repeated at every
        restart); else the job was dead-lettered, uncalled."""
        key = self.proto.result_key(env.id, env.reply_to)
        assert key is not None  # a parsed envelope has an id
        known, self._known_kind = self._known_kind, None
        if known is not None and known[0] is raw and known[1] == key:
            kind: str | None = known[2]  # read during the previous call
        else:
            kind = await self.inflight.result_key_kind(raw, key)
        if kind is None:  # Redis refused to say: dead-lettered already (or stopping)
            return False
        if kind in ("none", "list"):
            return True
        self.metrics.outcome(Outcome.DEAD, cause="malformed")
        if env.reply_to:  # answered at the job's own result key instead
            reason = f"reply_to key {key!r} is not a list (it holds a {kind})"
            answer_here = replace(env, reply_to=None)
            await self.inflight.dead_letter(raw, reason, env=answer_here, take_next=True)
        else:
            reason = f"result key {key!r} is not a list (it holds a {kind}); no result written"
            await self.inflight.dead_letter(raw, reason, env=env, take_next=True, keyless=True)
        return False

    async def fence(self, raw: bytes, epoch: int) -> bool:
        """Wait until the lease leaves room for a whole call; True: call job ``raw``
        now. False: it was handed back (stopping, or the lease was lost) or is no
        longer ours."""
        budget = self.timings.call_timeout + self.timings.fence_margin
        while True:
            if not self.lease.held:
                # A renewal found the lease gone or taken: another process may own
                # the slot, its in-flight list included, and recovers only what it
                # found there at takeover. A job that reached the list late (a take
                # sent before a SIGSTOP, answered after it) would wait here for a
                # lease that may never come back, stranded: hand it back, uncalled.
                await self.inflight.hand_back(raw)
                return False
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
        """Run the handler once, bounded by call_timeout, and judge its result."""
        s = self.settings
        call = Call(
            job_id=env.id,
            attempt=env.attempt,
            pool=s.pool,
            slot=s.slot,
            deadline=env.deadline,
            timeout=self.timings.call_timeout,
        )
        started_wall = time.time()
        self.metrics.queue_wait.observe(max(0.0, started_wall - env.submitted_at))
        self.metrics.attempts.observe(env.attempt)
        self.metrics.busy.set(1)
        self.calls.start()
        ahead = asyncio.create_task(self._ready_next()) if s.prefetch else None
        try:
            result, failed = await self._invoke(handler, env.payload, call)
        finally:
            busy_ms = self._end_call()  # also when a stop cancelled it
            if ahead is not None:  # its job, if any, is the next one (or handed back)
                await asyncio.gather(ahead, return_exceptions=True)
        if failed is not None:
            return replace(failed, busy_ms=busy_ms)
        return self._judge(env, result, started_wall, busy_ms)

    async def _ready_next(self) -> None:
        """During a call: take the next job ahead (after the last outcome written
        behind is in) and read what its result key holds, so that the next call
        starts without a round trip. What fails here is done the usual way later."""
        await self.refresh_signals()
        await self.inflight.prefetch()
        raw = self.inflight.peek_next()
        if raw is None:
            return
        try:
            env = parse_envelope(raw, max_bytes=self.settings.limits.max_envelope_bytes)
        except EnvelopeError:
            return  # dead-lettered when its turn comes
        key = self.proto.result_key(env.id, env.reply_to)
        if key is None or self.proto.reply_to_problem(env.reply_to):
            return
        kind = await self.inflight.peek_kind(key)
        if kind is not None:
            self._known_kind = (raw, key, kind)

    async def _invoke(
        self, handler: Handler, payload: Any, call: Call
    ) -> tuple[Any, Attempt | None]:
        """The handler's return value, or how it failed. Every exception of the
        handler is caught here, BaseExceptions too: only a stop's cancel goes on."""
        try:
            async with asyncio.timeout(call.timeout):
                return await handler.run(payload, call), None
        except TimeoutError:
            if not handler.is_async:
                self.overrun = True
            return None, Attempt(
                0, failure=f"call timed out after {call.timeout:g} s", cause="timeout"
            )
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # a stop (or a cancel of this task): it must go through
            return None, Attempt(0, failure=self._text(exc))  # the handler's own
        except RetryAfter as exc:
            failure = self._text(exc)
            return None, Attempt(0, failure=failure, throttled=True, retry_after=exc.seconds)
        except PermanentError as exc:
            return None, Attempt(0, failure=self._text(exc), cause="permanent", permanent=True)
        except Exception as exc:
            return None, Attempt(0, failure=self._text(exc))
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, ...: the slot goes on
            log.warning("the handler raised %s; dead-lettering the job", type(exc).__name__)
            failure = f"handler raised {self._text(exc)}"
            return None, Attempt(0, failure=failure, cause="permanent", permanent=True)

    def _judge(self, env: Envelope, result: Any, started_wall: float, busy_ms: int) -> Attempt:
        """The result record of a call that returned; a result that is not JSON or
        whose JSON is over max_result_bytes is a failure retrying cannot mend."""
        record_of = partial(
            result_record,
            job_id=env.id,
            status=Outcome.OK,
            attempt=env.attempt,
            slot=self.settings.slot,
            started_at=started_wall,
            finished_at=time.time(),
        )
        try:
            record = record_of(result=result)
        except (TypeError, ValueError, RecursionError) as exc:
            failure = f"result is not JSON-serialisable: {self._text(exc)}"
            return Attempt(busy_ms, failure=failure, cause="bad result", permanent=True)
        # The record with ``null`` for the result differs from it only there.
        size = _size(record) - _size(record_of(result=None)) + len("null")
        limit = self.settings.limits.max_result_bytes
        if size > limit:
            failure = f"result of {size} bytes is over the limit of {limit} bytes"
            return Attempt(busy_ms, failure=failure, cause="bad result", permanent=True)
        return Attempt(busy_ms, record=record)

    def _end_call(self) -> int:
        busy = self.calls.finish()
        self.metrics.busy.set(0)
        self.metrics.busy_seconds.inc(busy)
        return int(busy * 1000)

    async def _settle(self, raw: bytes, env: Envelope, attempt: Attempt) -> None:
        """Write the outcome of a call: ok, retried, or dead after the last attempt.
        With the next job already taken ahead, the write goes on behind its call
        (InFlight.behind); else it takes the next job along."""
        if attempt.throttled:  # written now: the next call must honour it
            await self._throttled(raw, env, attempt)
            return
        later = self.settings.prefetch and self.inflight.has_next()
        write = self._outcome(raw, env, attempt, take_next=not later)
        if later:
            self.inflight.behind(write)
        else:
            await write

    async def _throttled(self, raw: bytes, env: Envelope, attempt: Attempt) -> None:
        """The API said "slow down": the job goes back to the head of the queue with
        the same attempt, not before the wait it asked for (a Retry-After, at most
        ``max_pause``, pauses the whole pool as long) or a back-off."""
        now = time.time()
        said, pause = attempt.retry_after, 0.0
        if said is not None:
            pause = min(said, self.settings.max_pause)
            if said > pause:
                log.warning("the API asked for a pause of %g s; pausing %g s (max_pause)",
                            said, pause)  # fmt: skip
        wait = pause if said is not None else backoff(env.throttled)
        self.metrics.outcome(Outcome.THROTTLED)
        log.info("job %s: %s; back at the head of the queue for %.2f s%s", env.id,
                 attempt.failure, wait, " (the whole pool)" if pause else "")  # fmt: skip
        answer = await self.inflight.throttle(
            raw, env.throttled_again(now + wait), pause=pause, adapt=self.settings.adaptive
        )
        if answer is not None and answer.code == FinishCode.DONE:
            self._heard(answer.signals)

    async def _outcome(
        self, raw: bytes, env: Envelope, attempt: Attempt, *, take_next: bool
    ) -> None:
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
                take_next=take_next,
            )
        elif attempt.permanent or env.attempt >= max_attempts:
            self.metrics.outcome(Outcome.DEAD, cause=attempt.cause)
            verdict = "failed for good" if attempt.permanent else "failed"
            reason = f"attempt {env.attempt} of {max_attempts} {verdict}: {attempt.failure}"
            await self.inflight.dead_letter(
                raw, reason, env=env, busy_ms=attempt.busy_ms, take_next=take_next
            )
        else:
            self.metrics.outcome(Outcome.RETRIED, cause=attempt.cause)
            why = attempt.failure
            log.info("job %s attempt %d failed (%s); retrying", env.id, env.attempt, why)
            await self.inflight.retry(raw, env, take_next=take_next)


def _size(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without a copy when it is ASCII (as JSON mostly is)."""
    return len(text) if text.isascii() else len(text.encode())
