"""The slot worker: one process, one lease, at most one API call in flight.

Life of a slot (see layout.py for the keys and atomic steps):

1. Heartbeat (heartbeat.py): acquire the lease of slot ``i`` (or take it over at
   once from a dead predecessor of the same owner), then renew it every
   ``heartbeat_interval``; the lease (lease.py) counts its validity from the
   moment a renew was *sent*, so it never overstates it.
2. Recover what a previous incarnation left in ``inflight:<i>``: requeue it at
   the front with ``attempt + 1``, or dead-letter it after ``max_attempts``
   (inflight.py).
3. Loop: take a job with ``BLMOVE queue -> inflight:<i>`` (or along with the
   previous job's outcome) and take it to its one outcome (job_runner.py): no
   call starts unless the lease stays valid for ``call_timeout + fence_margin``.
   Nothing is taken while Redis may evict keys (``maxmemory`` with a policy
   other than ``noeviction``, unless ``allow_eviction``) or refuses the slot's
   steps (a permanent error: tried again every 10 s); /readyz says why
   (redis_checks.py, retrying.py).
4. SIGTERM: stop taking, finish the current call (it is bounded by its
   timeout), hand back a job taken but not started, release the lease, exit 0.
   Should the stop itself hang, a watchdog prints every task's stack and exits
   with ``SLOT_STUCK``; a sync handler that overran its timeout makes the
   process exit with ``SLOT_OVERRUN`` (its thread cannot be stopped).

State has one owner each: the lease (:class:`~apipool.lease.Lease`), the
heartbeat's record (:class:`~apipool.heartbeat.Heartbeat`), the call in
progress (:class:`~apipool.probes.CallTracker`), the job taken along with an
outcome (:class:`~apipool.inflight.InFlight`), the sync-overrun verdict
(:class:`~apipool.job_runner.JobRunner`); this module only wires them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import sys

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .exitcodes import ExitCode
from .handlers import Handler, load_handlers
from .health import HealthServer
from .heartbeat import Heartbeat
from .http_handler import close_http_session
from .inflight import InFlight
from .job_runner import JobRunner
from .lease import Lease
from .metrics import SlotMetrics
from .probes import CallTracker, Verdict, liveness, readiness
from .protocol import PoolProtocol
from .redis_checks import EvictionGuard
from .settings import SlotSettings
from .slot_time import SlotTime

log = logging.getLogger("apipool.slot")

BEAT_INTERVAL = 0.1
"""Seconds between the bytes a slot under a keeper writes to its beat pipe."""

STUCK_AFTER_GRACE = 5.0
"""Seconds past the shutdown grace after which a stop counts as stuck (tasks dumped, exit)."""
FAULTHANDLER_AFTER_GRACE = 10.0
"""Seconds past the shutdown grace after which faulthandler exits (a blocked event loop)."""


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
        self.timings = t = settings.timings
        self.proto = PoolProtocol(
            settings.pool,
            max_envelope_bytes=settings.limits.max_envelope_bytes,
            max_dead_letters=settings.limits.max_dead_letters,
        )
        if handlers is None:
            handlers = load_handlers(settings.handlers, http=settings.http, limits=settings.limits)
        self.handlers = handlers
        self.time = SlotTime()
        """Where this process's wall time goes, by state (slot_time.py)."""
        self.metrics = SlotMetrics(settings.pool, settings.slot, slot_time=self.time)
        self.stopping = asyncio.Event()
        self.health_port: int | None = None
        self.health_socket: socket.socket | None = None
        """A listening socket made by a keeper before it forked this process."""
        self.beat_fd: int | None = None
        """Under a keeper: the pipe this process's event loop writes a byte to
        every ``BEAT_INTERVAL`` seconds (keeper.py)."""
        self._stuck_timer: asyncio.TimerHandle | None = None

        self.ctl = _client(settings.redis_url, t.heartbeat_interval)
        self.work = _client(settings.redis_url, t.take_block + 5.0)
        self.lease = Lease(self.proto, settings.slot, settings.owner, t.lease_ttl)
        self.calls = CallTracker(slot_time=self.time)
        self.eviction = EvictionGuard(allow=settings.allow_eviction)
        self.heartbeat = Heartbeat(
            self.lease,
            self.ctl,
            t.heartbeat_interval,
            metrics=self.metrics,
            parent_pid=settings.parent_pid,
            on_orphaned=self.stop,
            eviction=self.eviction,
            slot_time=self.time,
        )
        self.inflight = InFlight(
            self.proto, settings, self.work, stopping=self.stopping, metrics=self.metrics
        )
        self.runner = JobRunner(
            settings,
            self.handlers,
            lease=self.lease,
            inflight=self.inflight,
            calls=self.calls,
            metrics=self.metrics,
            stopping=self.stopping,
            wait_lease_change=self.heartbeat.wait_change,
            held_back=lambda: self.time.state("held_back"),
        )
        self.inflight.may_take_next = self.may_take
        self.inflight.waiting = lambda: self.time.state("waiting_for_work")

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.SLOT_OVERRUN if self.runner.overrun else ExitCode.OK

    # -- probes ------------------------------------------------------------------

    def health(self) -> Verdict:
        """/healthz: the heartbeat ticks and no call overran its timeout."""
        return liveness(
            self.timings,
            since_tick=self.heartbeat.since_tick(),
            call_running_for=self.calls.running_for(),
        )

    def readiness(self) -> Verdict:
        """/readyz: Redis answers and takes the slot's steps, may not evict keys,
        the slot exists in the pool, the lease is valid."""
        return readiness(
            redis_ok=self.heartbeat.redis_ok,
            surplus=self.lease.surplus,
            lease_valid=self.lease.valid_for(0),
            refused=self.heartbeat.refused or self.eviction.problem or self.inflight.refused,
        )

    def may_take(self) -> bool:
        """Take a job now (by a take or along with an outcome)? Not while Redis may
        evict keys; else as the runner says (lease, stop, overrun)."""
        return self.eviction.problem is None and self.runner.may_take()

    # -- the work loop -------------------------------------------------------------

    async def _next_job(self) -> bytes | None:
        """The job taken along with the last outcome, else one take; None: none now."""
        raw = self.inflight.pop_next()
        if raw is not None:
            return raw
        await self.runner.refresh_signals()  # the pool's pause, its effective concurrency
        if self.runner.parked:  # above the effective concurrency: take nothing
            await close_http_session()  # and hold no connection to the API either
            with self.time.state("held_back"):
                await self.runner.wait_unparked()
            return None
        if not self.may_take():
            await self.heartbeat.wait_change(self.timings.heartbeat_interval)
            return None
        await self.inflight.hand_back_strays()
        try:
            return await self.inflight.take()
        except RedisError as exc:
            await self.inflight.take_failed(exc)  # a moment, or slowly when refused
            return None

    async def work_loop(self) -> None:
        """Wait for the lease, recover the predecessor's job, then take and run
        jobs until stopping; a job taken but not started goes back at the end."""
        while not self.lease.held and not self.stopping.is_set():
            await self.heartbeat.wait_change(self.timings.heartbeat_interval)
        if self.stopping.is_set():
            return
        self.time.enter("recovering")
        await self.inflight.recover_predecessor()
        self.time.enter("handoff")
        while not self.stopping.is_set():
            raw = await self._next_job()
            if raw is None:
                continue
            if self.stopping.is_set():
                await self.inflight.hand_back(raw)
                break
            await self.runner.run(raw, self.lease.epoch)
            if self.runner.overrun:
                log.error(
                    "a sync handler overran its timeout; exiting so its connection dies with us"
                )
                self.stop()
                break
        unstarted = self.inflight.pop_next()
        if unstarted is not None:  # taken along with the last outcome, never started
            await self.inflight.hand_back(unstarted)
        await self.inflight.settled()  # an outcome written behind the last call

    # -- lifecycle -----------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful stop (idempotent), bounded by a watchdog."""
        if self.stopping.is_set():
            return
        log.info("slot %d: stopping", self.settings.slot)
        self.stopping.set()
        self.heartbeat.wake()
        # Every step of a stop is bounded; should one still hang, print what
        # every task waits for and leave rather than outlive the grace period
        # (faulthandler covers a blocked event loop).
        grace = self.timings.shutdown_grace
        loop = asyncio.get_running_loop()
        self._stuck_timer = loop.call_later(grace + STUCK_AFTER_GRACE, self._stuck_at_stop)
        faulthandler.dump_traceback_later(grace + FAULTHANDLER_AFTER_GRACE, exit=True)

    def _stuck_at_stop(self) -> None:
        log.error("slot %d: still not stopped; dumping tasks and exiting", self.settings.slot)
        dump_tasks()
        logging.shutdown()
        os._exit(ExitCode.SLOT_STUCK)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)

    async def _start_health(self) -> HealthServer:
        s = self.settings
        server = HealthServer(
            health=self.health,
            readiness=self.readiness,
            registry=self.metrics.registry,
            info={"slot": s.slot, "pool": s.pool, "pid": os.getpid()},
            host=s.health_host,
            port=s.health_port,
            sock=self.health_socket,
        )
        self.health_port = await server.start()
        log.info(
            "slot %d of pool %r: health on %s:%s, handlers %s",
            s.slot,
            s.pool,
            s.health_host,
            self.health_port,
            ", ".join(h.spec for name, h in self.handlers.items() if name),
        )
        return server

    async def _beat(self, fd: int) -> None:
        """Tell the keeper this event loop runs: a byte every BEAT_INTERVAL."""
        while True:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                os.write(fd, b".")
            await asyncio.sleep(BEAT_INTERVAL)

    async def _release_lease(self) -> None:
        try:
            await self.lease.release(self.ctl)
        except RedisError as exc:
            log.warning("could not release the lease: %s", exc)

    async def prepare(self) -> None:
        """Open the Redis connections ahead of :meth:`run` (a warm standby does
        this while it waits: it takes nothing and calls nothing). A Redis that
        does not answer now is left to :meth:`run`'s own handling."""
        for client in (self.ctl, self.work):
            with contextlib.suppress(RedisError, OSError):
                # A read the slot's Redis ACL allows (PING is not granted).
                await client.hget(self.proto.keys.config, "slots")

    async def run(self) -> int:
        """Serve until stopped; returns the exit code (or leaves the process at
        once after a sync handler overran, see ExitCode.SLOT_OVERRUN)."""
        self.time.restart()  # a warm standby's wait was not the slot's time
        self._install_signals()
        server = await self._start_health()
        heartbeat = asyncio.create_task(self.heartbeat.run(), name="heartbeat")
        beats = [] if self.beat_fd is None else [asyncio.create_task(self._beat(self.beat_fd))]
        try:
            await self.work_loop()
        finally:
            heartbeat.cancel()
            for task in beats:
                task.cancel()
            await asyncio.gather(heartbeat, *beats, return_exceptions=True)
            await self.heartbeat.close_ledger()  # the seconds since the last beat
            await self._release_lease()
            await close_http_session()
            await server.stop()
            await self.ctl.aclose()
            await self.work.aclose()
        faulthandler.cancel_dump_traceback_later()  # stopped in time
        if self._stuck_timer is not None:
            self._stuck_timer.cancel()
        if self.runner.overrun:
            # The stuck handler thread cannot be stopped and would keep the
            # interpreter (and its connection to the API) alive: leave now.
            logging.shutdown()
            os._exit(ExitCode.SLOT_OVERRUN)
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
