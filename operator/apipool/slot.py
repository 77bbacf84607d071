"""The slot worker: one process, one lease, at most one API call in flight.

Life of a slot (see layout.py for the keys and atomic steps):

1. Heartbeat task: acquire the lease of slot ``i`` (or take it over at once from
   a dead predecessor of the same owner), then renew it every
   ``heartbeat_interval``. ``lease_valid_until`` is counted from the moment the
   renew was *sent*, so it never overstates the lease.
2. Recover what a previous incarnation left in ``inflight:<i>``: requeue it at
   the front with ``attempt + 1``, or dead-letter it after ``max_attempts``.
3. Loop: take a job with ``BLMOVE queue -> inflight:<i>``; dead-letter it when it
   is malformed or names an unknown handler; answer ``expired`` past its
   deadline; start the call only while the lease stays valid for longer than
   ``call_timeout + fence_margin`` (self-fencing); complete, retry or
   dead-letter it in one atomic step.
4. SIGTERM: stop taking, finish the current call (it is bounded by its
   timeout), hand back a job taken but not started, release the lease, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar, cast

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .envelope import Envelope, parse_envelope, result_record
from .errors import EnvelopeError
from .exitcodes import ExitCode
from .handlers import Call, Handler, load_handlers
from .http_handler import close_http_session
from .metrics import SlotMetrics
from .protocol import FinishCode, Finished, LeaseCode, Outcome, PoolProtocol, Step
from .recovery import DeadLetter, dead_letter, dead_letter_step, recover, recovery_step
from .settings import SlotSettings

log = logging.getLogger("apipool.slot")
T = TypeVar("T")

EXIT_OK = ExitCode.OK
EXIT_OVERRUN = ExitCode.SLOT_OVERRUN  # a sync handler overran its timeout
EXIT_STUCK = ExitCode.SLOT_STUCK  # a stop did not finish within its bound


def _client(url: str, timeout: float | None) -> aioredis.Redis:
    """A client that never retries on its own: a retried BLMOVE could take two jobs."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout or 2.0, 2.0),
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


class SlotWorker:
    """One slot of a pool. ``await run()`` returns the process exit code."""

    def __init__(self, settings: SlotSettings, handlers: dict[str, Handler] | None = None):
        self.settings = settings
        self.timings = settings.timings
        self.proto = PoolProtocol(settings.pool)
        self.keys = self.proto.keys
        self.handlers = handlers if handlers is not None else load_handlers(settings.handlers)
        self.metrics = SlotMetrics(settings.pool, settings.slot)
        self.token = f"{settings.owner}/{uuid.uuid4().hex}"
        self.inflight_key = self.keys.inflight(settings.slot)
        self.lease_key = self.keys.lease(settings.slot)

        self.lease_held = False
        self.lease_valid_until = 0.0  # time.monotonic()
        self.lease_epoch = 0  # bumped at every acquisition
        self.surplus = False  # slot index >= the pool's published size N
        self.redis_ok = False
        self.last_tick = time.monotonic()
        self.call_started: float | None = None
        self.exit_code = EXIT_OK
        self.health_port: int | None = None
        self.stopping = asyncio.Event()
        self._lease_changed = asyncio.Event()
        self._waiting_logged = False
        self._stuck_timer: asyncio.TimerHandle | None = None
        self._next: bytes | None = None  # taken along with the last outcome
        self._maybe_stray = False  # a take or a script's reply may have been lost

        t = self.timings
        self.ctl = _client(settings.redis_url, t.heartbeat_interval)
        self.work = _client(settings.redis_url, t.take_block + 5.0)

    # -- lease ------------------------------------------------------------------

    def lease_ok_for(self, seconds: float) -> bool:
        return (
            self.lease_held
            and not self.surplus
            and self.lease_valid_until - time.monotonic() > seconds
        )

    async def refresh_lease(self) -> None:
        """One heartbeat: renew the lease we hold, or try to get it."""
        ttl_ms = int(self.timings.lease_ttl * 1000)
        sent = time.monotonic()
        try:
            slot = self.settings.slot
            if self.lease_held:
                if await self.proto.renew(slot, self.token, ttl_ms).arun(self.ctl):
                    self.lease_valid_until = sent + self.timings.lease_ttl
                else:
                    self._lose_lease("the lease was gone or taken at renewal")
            else:
                answer = await self.proto.acquire(
                    slot, self.token, self.settings.owner, ttl_ms
                ).arun(self.ctl)
                if answer.held:
                    self._gain_lease(answer.code, answer.holder)
                    self.lease_valid_until = sent + self.timings.lease_ttl
                elif not self._waiting_logged:
                    self._waiting_logged = True
                    log.info(
                        "slot %d is held by %s for up to %d ms more; waiting",
                        slot,
                        answer.holder,
                        answer.pttl_ms,
                    )
            await self._check_pool_size()
            self.redis_ok = True
        except RedisError as exc:
            if self.redis_ok:
                log.warning("redis unreachable at heartbeat: %s", exc)
            self.redis_ok = False
        self.metrics.lease_held.set(1 if self.lease_ok_for(0) else 0)
        self._lease_changed.set()

    async def _check_pool_size(self) -> None:
        """A slot >= N (the pool's published size) calls nothing: after a
        scale-down, a process that outlived its pod must not be an extra slot."""
        raw = await self.ctl.hget(self.keys.config, "slots")
        size = int(raw) if raw is not None else None
        surplus = size is not None and self.settings.slot >= size
        if surplus != self.surplus:
            if surplus:
                log.warning(
                    "slot %d is beyond the pool's %s slots; not calling", self.settings.slot, size
                )
            self.surplus = surplus

    def _gain_lease(self, code: LeaseCode, previous: str) -> None:
        self.lease_held = True
        self.lease_epoch += 1
        self._waiting_logged = False
        if code == LeaseCode.TAKEN_OVER:
            log.info(
                "slot %d: took over the lease of dead predecessor %s", self.settings.slot, previous
            )
        else:
            log.info("slot %d: lease acquired", self.settings.slot)

    def _lose_lease(self, why: str) -> None:
        self.lease_held = False
        self.lease_valid_until = 0.0
        self.metrics.lease_losses.inc()
        log.warning(
            "slot %d: lease lost (%s); not calling until it is back", self.settings.slot, why
        )

    async def heartbeat_loop(self) -> None:
        interval = self.timings.heartbeat_interval
        task = asyncio.current_task()
        while True:
            started = time.monotonic()
            self.last_tick = started
            parent = self.settings.parent_pid
            if parent is not None and os.getppid() != parent and not self.stopping.is_set():
                log.warning("supervisor (pid %d) is gone; stopping", parent)
                self.stop()
            await self.refresh_lease()
            if task is not None and task.cancelling():
                # redis-py can turn a cancel that lands inside a command into a
                # RedisError, which refresh_lease takes for an outage: honour it.
                raise asyncio.CancelledError
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _wait_lease_change(self, timeout: float) -> None:
        self._lease_changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lease_changed.wait(), timeout)

    # -- redis writes that must happen ------------------------------------------

    async def _persist(self, what: str, op: Callable[[], Awaitable[T]]) -> T | None:
        """Retry a write until Redis takes it; give up only once stopping has
        outlasted the shutdown grace (the job then stays in flight and is
        recovered by the next incarnation)."""
        delay = 0.05
        give_up_at: float | None = None
        while True:
            try:
                return await op()
            except RedisError as exc:
                log.warning("%s failed (%s); retrying", what, exc)
                # The script may have run with its reply lost, taking a job we
                # do not know of: look at the in-flight list before the next take.
                self._maybe_stray = True
            if self.stopping.is_set():
                give_up_at = give_up_at or time.monotonic() + self.timings.shutdown_grace
                if time.monotonic() > give_up_at:
                    log.error("%s: giving up at shutdown; the job stays in flight", what)
                    return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _run_step(self, what: str, step: Step[Finished]) -> FinishCode | None:
        """Run a COMPLETE or REQUEUE step until Redis takes it; keep the next job it took."""
        return self._took(await self._persist(what, lambda: step.arun(self.work)))

    async def _finish(
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
        step = self.proto.complete(
            self.settings.slot,
            raw,
            result_key=self.proto.result_key(job_id, reply_to),
            record=record,
            ttl_ms=self._ttl_ms,
            outcome=outcome,
            busy_ms=busy_ms,
            take_next=take_next and self._may_take_next(),
        )
        done = await self._run_step(f"completing job {job_id}", step)
        if done == FinishCode.WRONG_TYPE and reply_to:
            # The producer's reply_to key holds another type: answer at the
            # default result key instead, as a dead letter that says why.
            reason = f"reply_to key {reply_to!r} is not a list"
            dead = dead_letter(raw, reason, env=None, slot=self.settings.slot)
            await self._write_dead(raw, dead, busy_ms=busy_ms, take_next=take_next)
            return False
        if done == FinishCode.GONE:
            log.warning("job %s was no longer in flight here; outcome not written", job_id)
        return done == FinishCode.DONE

    def _may_take_next(self) -> bool:
        """Take the next job along with an outcome only while a call could start."""
        t = self.timings
        return (
            not self.stopping.is_set()
            and self.exit_code == EXIT_OK
            and self.lease_ok_for(t.call_timeout + t.fence_margin + t.take_block)
        )

    @property
    def _ttl_ms(self) -> int:
        return int(self.settings.result_ttl * 1000)

    def _took(self, answer: Finished | None) -> FinishCode | None:
        """Read a COMPLETE or REQUEUE answer; keep the next job it took."""
        if answer is None:
            return None
        if answer.next is not None:
            self._next = answer.next
        return answer.code

    async def _dead_letter(
        self,
        raw: bytes,
        reason: str,
        *,
        env: Envelope | None,
        busy_ms: int = 0,
        take_next: bool = False,
    ) -> None:
        await self._write_dead(
            raw,
            dead_letter(raw, reason, env=env, slot=self.settings.slot),
            busy_ms=busy_ms,
            take_next=take_next,
        )

    async def _write_dead(
        self, raw: bytes, dead: DeadLetter, *, busy_ms: int = 0, take_next: bool = False
    ) -> None:
        log.warning("dead-lettering job %s: %s", dead.job_id, dead.reason)
        step = dead_letter_step(
            self.proto,
            self.settings.slot,
            raw,
            dead,
            ttl_ms=self._ttl_ms,
            busy_ms=busy_ms,
            take_next=take_next and self._may_take_next(),
        )
        await self._run_step(f"dead-lettering job {dead.job_id}", step)

    async def _requeue_job(
        self,
        raw: bytes,
        new_raw: str | bytes,
        *,
        front: bool,
        outcome: Outcome | None,
        take_next: bool = False,
    ) -> bool:
        step = self.proto.requeue(
            self.settings.slot,
            raw,
            new_raw,
            front=front,
            outcome=outcome,
            take_next=take_next and self._may_take_next(),
        )
        return await self._run_step("requeueing a job", step) == FinishCode.DONE

    # -- typed Redis reads (redis-py's stubs allow str replies; ours are bytes) --

    async def _take(self) -> bytes | None:
        """BLMOVE queue -> inflight:<i>; a decimal timeout, which Redis >= 6 accepts."""
        timeout = self.timings.take_block
        raw = await self.work.blmove(self.keys.queue, self.inflight_key, timeout, "RIGHT", "LEFT")  # type: ignore[arg-type]
        return cast(bytes | None, raw)

    async def _inflight_items(self) -> list[bytes]:
        return cast(list[bytes], await self.work.lrange(self.inflight_key, 0, -1))

    async def _still_in_flight(self, raw: bytes) -> bool:
        return await self.work.lpos(self.inflight_key, raw) is not None  # type: ignore[arg-type]

    # -- recovery ---------------------------------------------------------------

    async def recover_inflight(self, *, predecessor: bool) -> None:
        """Deal with what is in our in-flight list while we run no call.

        ``predecessor``: left by an earlier incarnation that may have called the
        API, so it costs an attempt; otherwise taken by us but never started (a
        take whose reply was lost), so it goes back unchanged.
        """
        items = await self._persist("reading the in-flight list", self._inflight_items) or []
        for raw in items:
            if not predecessor:
                await self._requeue_job(raw, raw, front=True, outcome=None)
                continue
            s = self.settings
            outcome = recover(
                raw,
                proto=self.proto,
                slot=s.slot,
                max_attempts=s.max_attempts,
                max_bytes=s.max_envelope_bytes,
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
            await self._run_step(
                "recovering a job",
                recovery_step(self.proto, s.slot, raw, outcome, ttl_ms=self._ttl_ms),
            )

    # -- the work loop ----------------------------------------------------------

    async def work_loop(self) -> None:
        t = self.timings
        call_budget = t.call_timeout + t.fence_margin
        while not self.lease_held and not self.stopping.is_set():
            await self._wait_lease_change(t.heartbeat_interval)
        if self.stopping.is_set():
            return
        await self.recover_inflight(predecessor=True)
        self._maybe_stray = False
        while not self.stopping.is_set():
            raw, self._next = self._next, None
            if raw is None:
                if not self.lease_ok_for(call_budget + t.take_block):
                    await self._wait_lease_change(t.heartbeat_interval)
                    continue
                if self._maybe_stray:
                    self._maybe_stray = False
                    await self.recover_inflight(predecessor=False)
                try:
                    raw = await self._take()
                except RedisError as exc:
                    log.warning("take failed: %s", exc)
                    self._maybe_stray = True  # the move may have happened with its reply lost
                    await asyncio.sleep(0.2)
                    continue
                if raw is None:
                    continue
            if self.stopping.is_set():
                self._next = raw
                break
            await self._process_guarded(raw, self.lease_epoch)
            if self.exit_code != EXIT_OK:
                break
        if self._next is not None:  # taken, never started: back to the front
            await self._requeue_job(self._next, self._next, front=True, outcome=None)
            self._next = None

    async def _process_guarded(self, raw: bytes, epoch: int) -> None:
        """One bad job must never stop the slot (nor every slot after a restart)."""
        try:
            await self.process(raw, epoch)
        except Exception as exc:  # a bug of ours or an input nobody foresaw
            log.exception("internal error on a job; dead-lettering it")
            self.metrics.outcome(Outcome.DEAD)
            await self._dead_letter(raw, f"internal error handling this job: {exc!r}", env=None)

    async def process(self, raw: bytes, epoch: int) -> None:
        s = self.settings
        try:
            env = parse_envelope(raw, max_bytes=s.max_envelope_bytes)
        except EnvelopeError as exc:
            self.metrics.outcome(Outcome.DEAD, cause="malformed")
            await self._dead_letter(raw, f"malformed envelope: {exc}", env=None, take_next=True)
            return
        problem = self.proto.reply_to_problem(env.reply_to)
        if problem:
            self.metrics.outcome(Outcome.DEAD, cause="malformed")
            await self._dead_letter(
                raw,
                f"malformed envelope: {problem}",
                env=replace(env, reply_to=None),
                take_next=True,
            )
            return
        handler = self.handlers.get(env.handler or "")
        if handler is None:
            known = ", ".join(sorted(name for name in self.handlers if name))
            self.metrics.outcome(Outcome.DEAD, cause="unknown handler")
            await self._dead_letter(
                raw,
                f"unknown handler {env.handler!r}; this pool serves: {known}",
                env=env,
                take_next=True,
            )
            return
        if env.expired(time.time()):
            self.metrics.outcome(Outcome.EXPIRED)
            await self._finish(
                raw,
                job_id=env.id,
                reply_to=env.reply_to,
                record=result_record(
                    job_id=env.id,
                    status=Outcome.EXPIRED,
                    attempt=env.attempt,
                    slot=s.slot,
                    error="deadline passed before the call could start",
                ),
                outcome=Outcome.EXPIRED,
                take_next=True,
            )
            return
        if not await self._fence(raw, epoch):
            return
        await self._call(raw, env, handler)

    async def _fence(self, raw: bytes, epoch: int) -> bool:
        """Wait until the lease leaves room for a whole call; False hands the job back."""
        t = self.timings
        budget = t.call_timeout + t.fence_margin
        while True:
            if self.lease_ok_for(budget):
                if epoch == self.lease_epoch:
                    return True
                # The lease was lost and won again since the take: someone else
                # may have recovered this job meanwhile. Call it only if still ours.
                try:
                    still_ours = await self._still_in_flight(raw)
                except RedisError:
                    still_ours = False
                if still_ours:
                    return True
                log.warning("job taken before a lease loss is gone from in-flight; dropped here")
                return False
            if self.stopping.is_set():
                await self._requeue_job(raw, raw, front=True, outcome=None)
                return False
            await self._wait_lease_change(t.heartbeat_interval)

    async def _call(self, raw: bytes, env: Envelope, handler: Handler) -> None:
        s = self.settings
        timeout = s.timings.call_timeout
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
        self.call_started = started = time.monotonic()
        failure: str | None = None
        cause = "error"
        record = ""
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
        except TimeoutError:
            failure = f"call timed out after {timeout:g} s"
            cause = "timeout"
            if not handler.is_async:
                self.exit_code = EXIT_OVERRUN
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            busy = time.monotonic() - started
            self.call_started = None
            self.metrics.busy.set(0)
            self.metrics.busy_seconds.inc(busy)
        busy_ms = int(busy * 1000)

        if failure is None:
            self.metrics.outcome(Outcome.OK)
            await self._finish(
                raw,
                job_id=env.id,
                reply_to=env.reply_to,
                record=record,
                outcome=Outcome.OK,
                busy_ms=busy_ms,
                take_next=True,
            )
        elif env.attempt >= s.max_attempts:
            self.metrics.outcome(Outcome.DEAD, cause=cause)
            await self._dead_letter(
                raw,
                f"attempt {env.attempt} of {s.max_attempts} failed: {failure}",
                env=env,
                busy_ms=busy_ms,
                take_next=True,
            )
        else:
            self.metrics.outcome(Outcome.RETRIED, cause=cause)
            log.info("job %s attempt %d failed (%s); retrying", env.id, env.attempt, failure)
            await self._requeue_job(
                raw,
                env.next_attempt().to_json(),
                front=False,
                outcome=Outcome.RETRIED,
                take_next=True,
            )
        if self.exit_code == EXIT_OVERRUN:
            log.error("a sync handler overran its timeout; exiting so its connection dies with us")
            self.stop()

    # -- health -----------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        t = self.timings
        now = time.monotonic()
        if now - self.last_tick > 3 * t.heartbeat_interval + 1.0:
            return False, "heartbeat loop stalled"
        started = self.call_started
        if started is not None and now - started > t.call_timeout + t.health_grace:
            return False, f"call running for {now - started:.1f} s, over its timeout"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        if not self.redis_ok:
            return False, "redis unreachable"
        if self.surplus:
            return False, "slot index is beyond the pool's size"
        if not self.lease_ok_for(0):
            return False, "lease not held"
        return True, "ok"

    async def start_health_server(self) -> web.AppRunner:
        async def probe(check: Callable[[], tuple[bool, str]]) -> web.Response:
            ok, why = check()
            return web.json_response(
                {"ok": ok, "reason": why, "slot": self.settings.slot, "pool": self.settings.pool},
                status=200 if ok else 503,
            )

        async def healthz(_: web.Request) -> web.Response:
            return await probe(self.health)

        async def readyz(_: web.Request) -> web.Response:
            return await probe(self.readiness)

        async def metrics(_: web.Request) -> web.Response:
            body = generate_latest(self.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.health_host, self.settings.health_port)
        await site.start()
        addresses = runner.addresses
        self.health_port = int(addresses[0][1]) if addresses else None
        return runner

    # -- lifecycle --------------------------------------------------------------

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("slot %d: stopping", self.settings.slot)
            self.stopping.set()
            self._lease_changed.set()
            # Every step of a stop is bounded; should one still hang, print what
            # every task waits for and leave rather than outlive the grace period
            # (faulthandler covers a blocked event loop).
            grace = self.timings.shutdown_grace
            self._stuck_timer = asyncio.get_running_loop().call_later(
                grace + 5.0, self._stuck_at_stop
            )
            faulthandler.dump_traceback_later(grace + 10.0, exit=True)

    def _stuck_at_stop(self) -> None:
        log.error("slot %d: still not stopped; dumping tasks and exiting", self.settings.slot)
        dump_tasks()
        logging.shutdown()
        os._exit(EXIT_STUCK)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        runner = await self.start_health_server()
        log.info(
            "slot %d of pool %r: health on %s:%s, handlers %s",
            self.settings.slot,
            self.settings.pool,
            self.settings.health_host,
            self.health_port,
            ", ".join(h.spec for name, h in self.handlers.items() if name),
        )
        heartbeat = asyncio.create_task(self.heartbeat_loop(), name="heartbeat")
        try:
            await self.work_loop()
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            if self.lease_held:
                try:
                    await self.proto.release(self.settings.slot, self.token).arun(self.ctl)
                    log.info("slot %d: lease released", self.settings.slot)
                except RedisError as exc:
                    log.warning("could not release the lease: %s", exc)
            await close_http_session()
            await runner.cleanup()
            await self.ctl.aclose()
            await self.work.aclose()
        faulthandler.cancel_dump_traceback_later()  # stopped in time
        if self._stuck_timer is not None:
            self._stuck_timer.cancel()
        if self.exit_code == EXIT_OVERRUN:
            # The stuck handler thread cannot be stopped and would keep the
            # interpreter (and its connection to the API) alive: leave now.
            logging.shutdown()
            os._exit(EXIT_OVERRUN)
        return self.exit_code


def dump_tasks() -> None:
    """SIGUSR1: print the stack of every task to stderr (what is this slot waiting for?)."""
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}: {task.get_coro()!r}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def run_slot(settings: SlotSettings) -> int:
    """Run a slot worker in this process until it stops; returns the exit code."""
    return asyncio.run(SlotWorker(settings).run())
