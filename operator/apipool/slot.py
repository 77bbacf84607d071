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
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .envelope import (
    STATUS_EXPIRED,
    STATUS_OK,
    Envelope,
    parse_envelope,
    result_record,
)
from .errors import EnvelopeError
from .handlers import Call, Handler, close_http_session, load_handlers
from .layout import (
    ACQUIRE_SCRIPT,
    COMPLETE_SCRIPT,
    RELEASE_SCRIPT,
    RENEW_SCRIPT,
    REQUEUE_SCRIPT,
    PoolKeys,
)
from .metrics import SlotMetrics
from .recovery import DeadLetter, dead_letter, recover, reply_to_problem
from .settings import SlotSettings

log = logging.getLogger("apipool.slot")
T = TypeVar("T")

EXIT_OK = 0
EXIT_OVERRUN = 3  # a sync handler overran its timeout; its thread cannot be stopped
EXIT_STUCK = 4  # a stop did not finish within its bound


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
        self.keys = PoolKeys(settings.pool)
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
        self._acquire = self.ctl.register_script(ACQUIRE_SCRIPT)
        self._renew = self.ctl.register_script(RENEW_SCRIPT)
        self._release = self.ctl.register_script(RELEASE_SCRIPT)
        self._complete = self.work.register_script(COMPLETE_SCRIPT)
        self._requeue = self.work.register_script(REQUEUE_SCRIPT)

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
            if self.lease_held:
                if await self._renew(keys=[self.lease_key], args=[self.token, ttl_ms]):
                    self.lease_valid_until = sent + self.timings.lease_ttl
                else:
                    self._lose_lease("the lease was gone or taken at renewal")
            else:
                code, holder, pttl = await self._acquire(
                    keys=[self.lease_key],
                    args=[self.token, f"{self.settings.owner}/", ttl_ms],
                )
                if int(code) > 0:
                    self._gain_lease(int(code), holder)
                    self.lease_valid_until = sent + self.timings.lease_ttl
                elif not self._waiting_logged:
                    self._waiting_logged = True
                    log.info(
                        "slot %d is held by %s for up to %d ms more; waiting",
                        self.settings.slot,
                        holder.decode(errors="replace"),
                        int(pttl),
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

    def _gain_lease(self, code: int, previous: bytes) -> None:
        self.lease_held = True
        self.lease_epoch += 1
        self._waiting_logged = False
        if code == 3:
            log.info(
                "slot %d: took over the lease of dead predecessor %s",
                self.settings.slot,
                previous.decode(errors="replace"),
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

    async def _finish(
        self,
        raw: bytes,
        *,
        job_id: str | None,
        reply_to: str | None,
        record: str,
        counter: str,
        busy_ms: int = 0,
        dead_entry: str = "",
        take_next: bool = False,
    ) -> bool:
        result_key = reply_to or (self.keys.result(job_id) if job_id else "")
        ttl_ms = int(self.settings.result_ttl * 1000)
        take = "1" if take_next and self._may_take_next() else ""
        answer = await self._persist(
            f"completing job {job_id}",
            lambda: self._complete(
                keys=[
                    self.inflight_key,
                    result_key,
                    self.keys.stats,
                    self.keys.dead,
                    self.keys.queue,
                ],
                args=[raw, record, ttl_ms, counter, busy_ms, dead_entry, take],
            ),
        )
        done = self._took(answer)
        if done == -1 and reply_to:
            # The producer's reply_to key holds another type: answer at the
            # default result key instead, as a dead letter that says why.
            reason = f"reply_to key {reply_to!r} is not a list"
            dead = dead_letter(raw, reason, env=None, slot=self.settings.slot)
            await self._write_dead(raw, dead, busy_ms=busy_ms, take_next=take_next)
            return False
        if done == 0:
            log.warning("job %s was no longer in flight here; outcome not written", job_id)
        return done == 1

    def _may_take_next(self) -> bool:
        """Take the next job along with an outcome only while a call could start."""
        t = self.timings
        return (
            not self.stopping.is_set()
            and self.exit_code == EXIT_OK
            and self.lease_ok_for(t.call_timeout + t.fence_margin + t.take_block)
        )

    def _took(self, answer: Any) -> int | None:
        """Read a COMPLETE or REQUEUE answer ``[code, next]``; keep ``next``."""
        if answer is None:
            return None
        code, nxt = answer
        if nxt is not None:
            self._next = nxt
        return int(code)

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
        await self._finish(
            raw,
            job_id=dead.job_id,
            reply_to=dead.reply_to,
            record=dead.record,
            counter="dead",
            busy_ms=busy_ms,
            dead_entry=dead.entry,
            take_next=take_next,
        )

    async def _requeue_job(
        self,
        raw: bytes,
        new_raw: str | bytes,
        *,
        front: bool,
        counter: str,
        take_next: bool = False,
    ) -> bool:
        take = "1" if take_next and self._may_take_next() else ""
        answer = await self._persist(
            "requeueing a job",
            lambda: self._requeue(
                keys=[self.inflight_key, self.keys.queue, self.keys.stats],
                args=[raw, new_raw, "front" if front else "back", counter, take],
            ),
        )
        return self._took(answer) == 1

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
                await self._requeue_job(raw, raw, front=True, counter="")
                continue
            s = self.settings
            outcome = recover(
                raw,
                keys=self.keys,
                slot=s.slot,
                max_attempts=s.max_attempts,
                max_bytes=s.max_envelope_bytes,
                why="slot died",
            )
            if outcome.retry is not None and outcome.env is not None:
                log.info(
                    "recovered job %s left in flight (attempt %d)",
                    outcome.env.id,
                    outcome.env.attempt,
                )
                await self._requeue_job(raw, outcome.retry, front=True, counter="recovered")
            elif outcome.dead is not None:
                await self._write_dead(raw, outcome.dead)

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
            await self._requeue_job(self._next, self._next, front=True, counter="")
            self._next = None

    async def _process_guarded(self, raw: bytes, epoch: int) -> None:
        """One bad job must never stop the slot (nor every slot after a restart)."""
        try:
            await self.process(raw, epoch)
        except Exception as exc:  # a bug of ours or an input nobody foresaw
            log.exception("internal error on a job; dead-lettering it")
            self.metrics.outcome("dead")
            await self._dead_letter(raw, f"internal error handling this job: {exc!r}", env=None)

    async def process(self, raw: bytes, epoch: int) -> None:
        s = self.settings
        try:
            env = parse_envelope(raw, max_bytes=s.max_envelope_bytes)
        except EnvelopeError as exc:
            self.metrics.outcome("malformed")
            await self._dead_letter(raw, f"malformed envelope: {exc}", env=None, take_next=True)
            return
        problem = reply_to_problem(env, self.keys)
        if problem:
            self.metrics.outcome("malformed")
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
            self.metrics.outcome("dead")
            await self._dead_letter(
                raw,
                f"unknown handler {env.handler!r}; this pool serves: {known}",
                env=env,
                take_next=True,
            )
            return
        if env.expired(time.time()):
            self.metrics.outcome("expired")
            await self._finish(
                raw,
                job_id=env.id,
                reply_to=env.reply_to,
                record=result_record(
                    job_id=env.id,
                    status=STATUS_EXPIRED,
                    attempt=env.attempt,
                    slot=s.slot,
                    error="deadline passed before the call could start",
                ),
                counter="expired",
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
                await self._requeue_job(raw, raw, front=True, counter="")
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
        outcome = "ok"
        record = ""
        try:
            async with asyncio.timeout(timeout):
                result = await handler.run(env.payload, call)
            record = result_record(
                job_id=env.id,
                status=STATUS_OK,
                attempt=env.attempt,
                slot=s.slot,
                result=result,
                started_at=started_wall,
            )
        except TimeoutError:
            failure = f"call timed out after {timeout:g} s"
            outcome = "timeout"
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
            self.metrics.outcome("ok")
            await self._finish(
                raw,
                job_id=env.id,
                reply_to=env.reply_to,
                record=record,
                counter="ok",
                busy_ms=busy_ms,
                take_next=True,
            )
        elif env.attempt >= s.max_attempts:
            self.metrics.outcome("dead" if outcome == "ok" else outcome)
            await self._dead_letter(
                raw,
                f"attempt {env.attempt} of {s.max_attempts} failed: {failure}",
                env=env,
                busy_ms=busy_ms,
                take_next=True,
            )
        else:
            self.metrics.outcome("retry" if outcome == "ok" else outcome)
            log.info("job %s attempt %d failed (%s); retrying", env.id, env.attempt, failure)
            await self._requeue_job(
                raw, env.next_attempt().to_json(), front=False, counter="retried", take_next=True
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
                    await self._release(keys=[self.lease_key], args=[self.token])
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
