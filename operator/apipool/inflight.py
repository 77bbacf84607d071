"""A slot's in-flight list: every move of a job into it and every write out of it.

Guarantees of :class:`InFlight` (see layout.py for TAKE, COMPLETE and REQUEUE):

- a job enters ``inflight:<i>`` only by :meth:`~InFlight.take` or along with
  the outcome of the previous job (``take_next``), and leaves only by COMPLETE
  or REQUEUE, so it is always in exactly one place;
- each COMPLETE or REQUEUE is retried until Redis takes it; it is given up only
  once a stop has lasted the shutdown grace, and the job then stays in flight
  for the next incarnation to recover;
- a job taken along with an outcome is kept until :meth:`~InFlight.pop_next`;
- after a take or a script whose reply may have been lost, the list is looked
  at (:meth:`~InFlight.hand_back_strays`) before the next take, so a job moved
  without our knowing is not left behind;
- the next job is taken along with an outcome only while ``may_take_next()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .envelope import Envelope
from .metrics import SlotMetrics
from .protocol import FinishCode, Finished, Outcome, PoolProtocol, Step
from .recovery import DeadLetter, dead_letter, dead_letter_step, recover, recovery_step
from .settings import SlotSettings

log = logging.getLogger("apipool.slot")
T = TypeVar("T")


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

    @property
    def _ttl_ms(self) -> int:
        return int(self.settings.result_ttl * 1000)

    # -- into the list -------------------------------------------------------------

    async def take(self) -> bytes | None:
        """TAKE (an over-limit envelope is dead-lettered inside Redis and never
        reaches us); when the queue is empty, WAIT: BLMOVE queue -> inflight:<i>
        for up to ``take_block`` seconds (a decimal timeout, which Redis >= 6
        accepts). A Redis error propagates."""
        timeout = self.settings.timings.take_block
        try:
            taken = await self.proto.take(self.slot).arun(self.r)
            self.oversize_dropped(taken.skipped)
            if taken.job is not None:
                return taken.job
            raw = await self.r.blmove(self.proto.keys.queue, self.key, timeout, "RIGHT", "LEFT")  # type: ignore[arg-type]
        except RedisError:
            self.maybe_stray = True  # the move may have happened with its reply lost
            raise
        return cast(bytes | None, raw)

    def oversize_dropped(self, count: int) -> None:
        """Count envelopes that Redis dead-lettered for their size while we took."""
        if count:
            log.warning("%d over-limit envelope(s) dead-lettered by size, unread", count)
            metrics = self.metrics
            for _ in range(count if metrics is not None else 0):
                assert metrics is not None
                metrics.outcome(Outcome.DEAD, cause="malformed")

    def pop_next(self) -> bytes | None:
        """The job taken along with the last outcome, once; None when there is none."""
        raw, self._next = self._next, None
        return raw

    async def items(self) -> list[bytes]:
        return cast(list[bytes], await self.r.lrange(self.key, 0, -1))

    async def holds(self, raw: bytes) -> bool:
        """Whether this exact envelope is still in the list (a Redis error propagates)."""
        return await self.r.lpos(self.key, raw) is not None  # type: ignore[arg-type]

    # -- writes that must happen -----------------------------------------------------

    async def _persist(self, what: str, op: Callable[[], Awaitable[T]]) -> T | None:
        """Retry ``op`` until Redis takes it; None once stopping outlasted the grace."""
        delay = 0.05
        give_up_at: float | None = None
        while True:
            try:
                return await op()
            except RedisError as exc:
                log.warning("%s failed (%s); retrying", what, exc)
                # The script may have run with its reply lost, taking a job we
                # do not know of: look at the in-flight list before the next take.
                self.maybe_stray = True
            if self.stopping.is_set():
                grace = self.settings.timings.shutdown_grace
                give_up_at = give_up_at or time.monotonic() + grace
                if time.monotonic() > give_up_at:
                    log.error("%s: giving up at shutdown; the job stays in flight", what)
                    return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _run(self, what: str, step: Step[Finished]) -> FinishCode | None:
        """Run a COMPLETE or REQUEUE step until Redis takes it; keep the next job it took."""
        answer = await self._persist(what, lambda: step.arun(self.r))
        if answer is None:
            return None
        if answer.next is not None:
            self._next = answer.next
        self.oversize_dropped(answer.skipped)
        return answer.code

    def _take_next(self, wanted: bool) -> bool:
        return wanted and self.may_take_next()

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
        that is not a list gets the job dead-lettered at its default result key."""
        step = self.proto.complete(
            self.slot,
            raw,
            result_key=self.proto.result_key(job_id, reply_to),
            record=record,
            ttl_ms=self._ttl_ms,
            outcome=outcome,
            busy_ms=busy_ms,
            take_next=self._take_next(take_next),
        )
        done = await self._run(f"completing job {job_id}", step)
        if done == FinishCode.WRONG_TYPE and reply_to:
            reason = f"reply_to key {reply_to!r} is not a list"
            dead = dead_letter(raw, reason, env=None, slot=self.slot)
            await self.write_dead(raw, dead, busy_ms=busy_ms, take_next=take_next)
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
    ) -> None:
        """Dead-letter the job: result record, dead-letter entry and counter at once."""
        dead = dead_letter(raw, reason, env=env, slot=self.slot)
        await self.write_dead(raw, dead, busy_ms=busy_ms, take_next=take_next)

    async def write_dead(
        self, raw: bytes, dead: DeadLetter, *, busy_ms: int = 0, take_next: bool = False
    ) -> None:
        log.warning("dead-lettering job %s: %s", dead.job_id, dead.reason)
        step = dead_letter_step(
            self.proto,
            self.slot,
            raw,
            dead,
            ttl_ms=self._ttl_ms,
            busy_ms=busy_ms,
            take_next=self._take_next(take_next),
        )
        await self._run(f"dead-lettering job {dead.job_id}", step)

    async def retry(self, raw: bytes, env: Envelope, *, take_next: bool = False) -> bool:
        """Queue the job again, at the back, as its next attempt (counted ``retried``)."""
        step = self.proto.requeue(
            self.slot,
            raw,
            env.next_attempt().to_json(),
            front=False,
            outcome=Outcome.RETRIED,
            take_next=self._take_next(take_next),
        )
        return await self._run("requeueing a job", step) == FinishCode.DONE

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
        for raw in await self._persist("reading the in-flight list", self.items) or []:
            outcome = recover(
                raw,
                proto=self.proto,
                slot=self.slot,
                max_attempts=s.max_attempts,
                max_bytes=s.limits.max_envelope_bytes,
                why="slot died",
            )
            if outcome.dead is not None:
                log.warning("dead-lettering job %s: %s", outcome.dead.job_id, outcome.dead.reason)
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
        if not self.maybe_stray:
            return
        self.maybe_stray = False
        for raw in await self._persist("reading the in-flight list", self.items) or []:
            await self.hand_back(raw)
