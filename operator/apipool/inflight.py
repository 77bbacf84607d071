"""A slot's in-flight list: every move of a job into it and every write out of it.

Guarantees of :class:`InFlight` (see layout.py for TAKE, COMPLETE and REQUEUE):

- a job enters ``inflight:<i>`` only by :meth:`~InFlight.take` or along with
  the outcome of the previous job (``take_next``), and leaves only by COMPLETE
  or REQUEUE, so it is always in exactly one place;
- each COMPLETE or REQUEUE is retried until Redis takes it, by the kind of
  error Redis gave (retrying.py): soon after a transient one; after a permanent
  one, a job's outcome is offered as a minimal dead letter (no result record)
  instead, and both are tried again every 10 s; it is given up only at a stop,
  and the job then stays in flight for the next incarnation to recover;
- a result key that holds something other than a list never strands a job: its
  dead letter is written without a result record;
- an envelope that WAIT moved in past ``max_envelope_bytes`` is dead-lettered
  by its size, neither parsed nor decoded here;
- a job taken along with an outcome is kept until :meth:`~InFlight.pop_next`;
- after a take or a script whose reply may have been lost, the list is looked
  at (:meth:`~InFlight.hand_back_strays`) before the next take, so a job moved
  without our knowing is not left behind;
- the next job is taken along with an outcome only while ``may_take_next()``;
- an outcome may be written behind the next call (:meth:`~InFlight.behind`),
  one at a time; every other step on the list waits for it first
  (:meth:`~InFlight.settled`), AHEAD included, so the list holds at most two
  jobs: the one being called and one ahead, or the one being called and the
  one whose outcome is on its way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .envelope import Envelope
from .metrics import SlotMetrics
from .protocol import FinishCode, Finished, Outcome, PoolProtocol, Step, Throttled
from .recovery import DeadLetter, dead_letter, recover, recovery_step
from .redact import redact_text
from .retrying import Retrier
from .settings import SlotSettings

log = logging.getLogger("apipool.slot")
TAKING = "taking a job"


class InFlight:
    """Slot ``settings.slot``'s in-flight list, written through ``r``."""

    def __init__(
        self,
        proto: PoolProtocol,
        settings: SlotSettings,
        r: aioredis.Redis,
        *,
        stopping: asyncio.Event,
        may_take_next: Callable[[], bool] = lambda: False,
        metrics: SlotMetrics | None = None,
    ) -> None:
        self.proto = proto
        self.metrics = metrics
        self.settings = settings
        self.slot = settings.slot
        self.key = proto.keys.inflight(settings.slot)
        self.r = r
        self.stopping = stopping
        self.may_take_next = may_take_next
        self.maybe_stray = False
        """A take or a script's reply may have been lost: look before the next take."""
        self._next: bytes | None = None
        self.waiting: Callable[[], AbstractContextManager[object]] = nullcontext
        """Entered around the blocking take on an empty queue (slot time)."""
        self._behind: asyncio.Task[Any] | None = None
        """An outcome being written while the next job is called (:meth:`behind`)."""
        self.retrier = Retrier(
            stopping=stopping,
            grace=settings.timings.shutdown_grace,
            metrics=metrics,
            redact=settings.http.redact_headers,
            on_error=self._reply_maybe_lost,
        )

    def _reply_maybe_lost(self) -> None:
        # The script may have run with its reply lost, taking a job we do not
        # know of: look at the in-flight list before the next take.
        self.maybe_stray = True

    # -- an outcome written behind the next call ---------------------------------------

    def has_next(self) -> bool:
        """Whether a job was taken ahead (or along with an outcome) and not popped yet."""
        return self._next is not None

    def behind(self, write: Coroutine[Any, Any, Any]) -> None:
        """Write an outcome while the next job's call runs: its round trip leaves the
        time between two calls. One at a time (the caller has waited for the last
        through any step of this list); every later step waits for it first."""
        assert self._behind is None or self._behind.done(), "one outcome behind at a time"
        self._behind = asyncio.create_task(write, name="outcome-behind")

    async def settled(self) -> None:
        """Wait until an outcome written behind is in Redis (or was given up at a
        stop, the job left in flight for the next incarnation to recover)."""
        task = self._behind
        if task is None or task is asyncio.current_task():
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                raise  # we were cancelled, not the write
        except Exception:  # a bug of ours: the job stays in flight, recovered later
            log.exception("writing an outcome behind the next call failed")
        if task.done():
            self._behind = None

    @property
    def refused(self) -> str | None:
        """Why Redis refuses this slot's steps (a permanent error), else None."""
        return self.retrier.refused

    def redact(self, text: str) -> str:
        return redact_text(text, self.settings.http.redact_headers)

    def _dead_letter(self, raw: bytes, reason: str, *, env: Envelope | None) -> DeadLetter:
        """The dead letter of ``raw``; over the size limit it is never parsed."""
        return dead_letter(
            raw,
            reason,
            env=env,
            slot=self.slot,
            max_bytes=self.settings.limits.max_envelope_bytes,
            redact_headers=self.settings.http.redact_headers,
        )

    @property
    def _ttl_ms(self) -> int:
        return int(self.settings.result_ttl * 1000)

    # -- into the list -------------------------------------------------------------

    async def take(self) -> bytes | None:
        """TAKE (an over-limit envelope is dead-lettered inside Redis and never
        reaches us); when the queue is empty, WAIT: BLMOVE queue -> inflight:<i>
        for up to ``take_block`` seconds (a decimal timeout, which Redis >= 6
        accepts); what WAIT brings past ``max_envelope_bytes`` is dead-lettered
        here unread. A Redis error propagates (see :meth:`take_failed`)."""
        timeout = self.settings.timings.take_block
        await self.settled()
        try:
            taken = await self.proto.take(self.slot).arun(self.r)
            self.retrier.taken(TAKING)
            self.oversize_dropped(taken.skipped)
            if taken.job is not None:
                return taken.job
            with self.waiting():
                raw = await self.r.blmove(self.proto.keys.queue, self.key, timeout, "RIGHT", "LEFT")  # type: ignore[arg-type]
        except RedisError:
            self.maybe_stray = True  # the move may have happened with its reply lost
            raise
        job = cast(bytes | None, raw)
        if job is not None and len(job) > self.settings.limits.max_envelope_bytes:
            del job, raw  # unread: only its size was looked at
            await self.drop_oversize()
            return None
        return job

    async def prefetch(self) -> None:
        """During a call: take the next job into the list now (AHEAD), so that it
        starts without a round trip once this call ends. Only one ahead, only
        while the queue is long enough that no other slot waits for it, only
        while a take is allowed; a failure just leaves it to the usual take."""
        await self.settled()  # AHEAD takes nothing while that job is still listed
        if self._next is not None or not self.may_take_next():
            return
        try:
            taken = await self.proto.take_ahead(self.slot).arun(self.r)
        except RedisError as exc:
            self.maybe_stray = True  # the move may have happened with its reply lost
            log.info("prefetch failed (%s); taking the usual way", exc)
            return
        self.oversize_dropped(taken.skipped)
        if taken.job is not None:
            self._next = taken.job

    async def take_failed(self, exc: RedisError) -> None:
        """After a take failed: log and count it, then wait a moment (a transient
        error) or :data:`~apipool.redis_checks.REFUSED_RETRY` seconds (Redis
        refused it: ``refused`` says why meanwhile), less when a stop begins."""
        if self.retrier.note(TAKING, exc) == "transient":
            await asyncio.sleep(0.2)
        else:
            await self.retrier.pause(self.retrier.refused_retry)

    async def drop_oversize(self, *, only_if_any: bool = False) -> None:
        """Dead-letter every over-limit envelope in the list by its size and
        SHA-1, inside Redis: neither parsed nor sent back (an envelope over
        Redis's proto-max-bulk-len could not even be an argument of a step).
        ``only_if_any``: first look whether the list holds anything at all."""
        await self.settled()
        if only_if_any and not await self.retrier.run("reading the in-flight list", self.length):
            return
        step = self.proto.drop_oversize(self.slot)
        self.oversize_dropped(
            await self.retrier.run("dropping an over-limit envelope", lambda: step.arun(self.r))
            or 0
        )

    def oversize_dropped(self, count: int) -> None:
        """Count envelopes that Redis dead-lettered for their size while we took."""
        if count:
            log.warning("%d over-limit envelope(s) dead-lettered by size, unread", count)
            if self.metrics is not None:
                self.metrics.outcome(Outcome.DEAD, cause="malformed", count=count)

    def peek_next(self) -> bytes | None:
        """The job taken ahead, left where it is; None when there is none."""
        return self._next

    async def peek_kind(self, key: str) -> str | None:
        """What ``key`` holds (``none``, ``list``, ...), read once; None when Redis
        did not say (the usual check before the call then reads it again)."""
        try:
            answer = await self.r.type(key)
        except RedisError:
            return None
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def pop_next(self) -> bytes | None:
        """The job taken along with the last outcome, once; None when there is none."""
        raw, self._next = self._next, None
        return raw

    async def length(self) -> int:
        return int(await self.r.llen(self.key))

    async def items(self) -> list[bytes]:
        return cast(list[bytes], await self.r.lrange(self.key, 0, -1))

    async def holds(self, raw: bytes) -> bool:
        """Whether this exact envelope is still in the list (a Redis error propagates)."""
        return await self.r.lpos(self.key, raw) is not None  # type: ignore[arg-type]

    # -- writes that must happen -----------------------------------------------------

    async def _run(
        self, what: str, step: Step[Finished], *, raw: bytes | None = None
    ) -> FinishCode | None:
        """Run a COMPLETE or REQUEUE step until Redis takes it; keep the next job it
        took. With ``raw``, a step Redis refuses is offered as a minimal dead letter."""
        await self.settled()
        fallback = None if raw is None else self._minimal_dead_letter(raw)
        answer = await self.retrier.run(what, lambda: step.arun(self.r), fallback=fallback)
        if answer is None:
            return None
        if answer.next is not None:
            self._next = answer.next
        self.oversize_dropped(answer.skipped)
        return answer.code

    def _minimal_dead_letter(self, raw: bytes) -> Callable[[str], Awaitable[Finished]]:
        """The smallest step that still ends job ``raw``: COMPLETE with its dead
        letter only (no result record, no next job), given why Redis refused."""

        async def step(why: str) -> Finished:
            dead = self._dead_letter(raw, why, env=None)
            log.warning("dead-lettering job %s without a result: %s", dead.job_id, why)
            return await self._dead_step(raw, dead, result_key=None).arun(self.r)

        return step

    def _take_next(self, wanted: bool) -> bool:
        return wanted and self._next is None and self.may_take_next()

    async def complete(
        self,
        raw: bytes,
        *,
        job_id: str | None,
        reply_to: str | None,
        record: str,
        outcome: Outcome,
        busy_ms: int = 0,
        take_next: bool = False,
    ) -> bool:
        """Write the job's one outcome; True when written as asked. A ``reply_to``
        that is not a list gets the job dead-lettered at its default result key,
        a result key that is not a list gets it dead-lettered without a result."""
        result_key = self.proto.result_key(job_id, reply_to)
        step = self.proto.complete(
            self.slot,
            raw,
            result_key=result_key,
            record=record,
            ttl_ms=self._ttl_ms,
            outcome=outcome,
            busy_ms=busy_ms,
            take_next=self._take_next(take_next),
            # an answer at the job's own result key: counted if it expires unread
            unread=job_id if outcome == Outcome.OK and not reply_to else None,
        )
        done = await self._run(f"completing job {job_id}", step, raw=raw)
        if done == FinishCode.WRONG_TYPE:
            if reply_to:
                reason = f"reply_to key {reply_to!r} is not a list"
            else:
                reason = f"result key {result_key!r} is not a list; no result written"
            dead = self._dead_letter(raw, reason, env=None)
            keyless = not reply_to
            await self.write_dead(raw, dead, busy_ms=busy_ms, take_next=take_next, keyless=keyless)
            return False
        if done == FinishCode.GONE:
            log.warning("job %s was no longer in flight here; outcome not written", job_id)
        return done == FinishCode.DONE

    async def dead_letter(
        self,
        raw: bytes,
        reason: str,
        *,
        env: Envelope | None,
        busy_ms: int = 0,
        take_next: bool = False,
        keyless: bool = False,
    ) -> None:
        """Dead-letter the job: result record (unless ``keyless``), dead-letter
        entry and counter at once. ``reason`` is redacted first."""
        dead = self._dead_letter(raw, self.redact(reason), env=env)
        await self.write_dead(raw, dead, busy_ms=busy_ms, take_next=take_next, keyless=keyless)

    async def write_dead(
        self,
        raw: bytes,
        dead: DeadLetter,
        *,
        busy_ms: int = 0,
        take_next: bool = False,
        keyless: bool = False,
    ) -> None:
        """Write ``dead`` as the job's one outcome; when its result key holds
        something other than a list, again without a result record."""
        log.warning("dead-lettering job %s: %s", dead.job_id, self.redact(dead.reason))
        key = None if keyless else self.proto.result_key(dead.job_id, dead.reply_to)
        what = f"dead-lettering job {dead.job_id}"
        wanted = self._take_next(take_next)
        step = self._dead_step(raw, dead, result_key=key, busy_ms=busy_ms, take_next=wanted)
        if await self._run(what, step, raw=raw) == FinishCode.WRONG_TYPE:
            log.warning("result key %r is not a list; dead letter written without a result", key)
            step = self._dead_step(raw, dead, result_key=None, busy_ms=busy_ms, take_next=wanted)
            await self._run(what, step, raw=raw)

    def _dead_step(
        self,
        raw: bytes,
        dead: DeadLetter,
        *,
        result_key: str | None,
        busy_ms: int = 0,
        take_next: bool = False,
    ) -> Step[Finished]:
        return self.proto.complete(
            self.slot,
            raw,
            result_key=result_key,
            record=dead.record if result_key else "",
            ttl_ms=self._ttl_ms,
            outcome=Outcome.DEAD,
            busy_ms=busy_ms,
            dead_entry=dead.entry,
            take_next=take_next,
        )

    async def result_key_kind(self, raw: bytes, key: str) -> str | None:
        """What the key a job's result goes to holds (``none``, ``list``, ...), read
        before the call. None: Redis refused to say and the job was dead-lettered
        in a minimal step instead, or a stop gave up waiting for Redis."""

        async def kind() -> str:
            answer = await self.r.type(key)
            return answer.decode() if isinstance(answer, bytes) else str(answer)

        async def refused(why: str) -> str:
            await self._minimal_dead_letter(raw)(why)
            return ""

        what = f"checking result key {key!r}"
        return await self.retrier.run(what, kind, fallback=refused) or None

    async def retry(self, raw: bytes, env: Envelope, *, take_next: bool = False) -> bool:
        """Queue the job again, at the back, as its next attempt (counted ``retried``);
        dead-letter it instead when that envelope would not fit the size limit
        (TAKE would drop it by size, and its waiter would never hear of it)."""
        again = env.next_attempt().to_json()
        size, limit = len(again.encode()), self.settings.limits.max_envelope_bytes
        if size > limit:
            reason = (
                f"attempt {env.attempt} failed and its next envelope of {size} bytes "
                f"would be over the limit of {limit} bytes"
            )
            await self.dead_letter(raw, reason, env=env, take_next=take_next)
            return False
        step = self.proto.requeue(
            self.slot,
            raw,
            again,
            front=False,
            outcome=Outcome.RETRIED,
            take_next=self._take_next(take_next),
        )
        return await self._run("requeueing a job", step, raw=raw) == FinishCode.DONE

    async def throttle(
        self, raw: bytes, again: Envelope, *, pause: float, adapt: bool
    ) -> Throttled | None:
        """The API said "slow down" to job ``raw``: queue ``again`` (the same
        attempt, a ``not_before``) at the head, pause the pool ``pause`` seconds
        (0: no pause), with ``adapt`` one slot fewer in use (THROTTLE). Retried
        until Redis takes it; None when a stop gave up (the job stays in flight).
        An envelope that would no longer fit the size limit is dead-lettered."""
        text = again.to_json()
        size, limit = len(text.encode()), self.settings.limits.max_envelope_bytes
        if size > limit:
            reason = (
                f"the API asked to slow down and the job's next envelope of {size} bytes "
                f"would be over the limit of {limit} bytes"
            )
            await self.dead_letter(raw, reason, env=again)
            return None
        await self.settled()
        now = time.time()
        step = self.proto.throttle(
            self.slot,
            raw,
            text,
            pause_ms=int(pause * 1000),
            pause_until=now + pause,
            adapt=adapt,
            now_ms=int(now * 1000),
        )
        answer = await self.retrier.run("throttling a job", lambda: step.arun(self.r))
        if answer is not None and answer.code == FinishCode.GONE:
            log.warning("job %s was no longer in flight here; not queued again", again.id)
        return answer

    async def hand_back(self, raw: bytes) -> bool:
        """Put a job taken but never started back at the front of the queue, unchanged."""
        step = self.proto.requeue(self.slot, raw, raw, front=True, outcome=None)
        return await self._run("requeueing a job", step) == FinishCode.DONE

    # -- recovery ------------------------------------------------------------------

    async def recover_predecessor(self) -> None:
        """Deal with what an earlier incarnation left in the list: it may have
        called the API, so each job costs an attempt (retried at the front, or
        dead-lettered after its last attempt). Run before the first take."""
        s = self.settings
        await self.drop_oversize(only_if_any=True)
        for raw in await self.retrier.run("reading the in-flight list", self.items) or []:
            outcome = recover(
                raw,
                proto=self.proto,
                slot=self.slot,
                max_attempts=s.max_attempts,
                max_bytes=s.limits.max_envelope_bytes,
                why="slot died",
                redact_headers=s.http.redact_headers,
            )
            if outcome.dead is not None:
                reason = self.redact(outcome.dead.reason)
                log.warning("dead-lettering job %s: %s", outcome.dead.job_id, reason)
            elif outcome.env is not None:
                log.info(
                    "recovered job %s left in flight (attempt %d)",
                    outcome.env.id,
                    outcome.env.attempt,
                )
            step = recovery_step(self.proto, self.slot, raw, outcome, ttl_ms=self._ttl_ms)
            await self._run("recovering a job", step)
        self.maybe_stray = False

    async def hand_back_strays(self) -> None:
        """When a reply may have been lost, hand back (unchanged, to the front)
        what sits in the list: taken by us, never started. Run while no call runs."""
        await self.settled()  # a job written behind is not a stray
        if not self.maybe_stray:
            return
        self.maybe_stray = False
        await self.drop_oversize(only_if_any=True)
        for raw in await self.retrier.run("reading the in-flight list", self.items) or []:
            await self.hand_back(raw)
