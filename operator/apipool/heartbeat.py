"""A slot's heartbeat: keeps its lease and tells liveness that the process is alive.

Guarantees of :class:`Heartbeat`:

- one beat every ``interval`` (measured from the start of the previous one):
  renew the lease, or try to acquire it, then read the pool's size;
- :attr:`Heartbeat.last_tick` is the clock at the start of the latest beat, and
  :attr:`Heartbeat.redis_ok` whether that beat reached Redis;
  :attr:`Heartbeat.refused` says why Redis refused it (a permanent error), if it did;
- each beat also lets the :class:`~apipool.redis_checks.EvictionGuard`, when
  given, read Redis's memory policy when a check is due;
- tasks in :meth:`Heartbeat.wait_change` wake after every beat and at
  :meth:`Heartbeat.wake`;
- when the process's parent is no longer ``parent_pid`` (the local supervisor is
  gone), ``on_orphaned`` is called, once;
- :meth:`Heartbeat.run` ends when cancelled, also when redis-py turned the cancel
  into a :class:`~redis.exceptions.RedisError` inside a command;
- given the slot's :class:`~apipool.slot_time.SlotTime`, each beat tells it
  whether the slot is fenced (Redis unreachable or refusing, or the lease not
  valid) and writes the seconds per state since the previous beat to the
  pool's ledger (LEDGER in layout.py), split at minute boundaries. The write
  runs beside the beats, never in their way; a failed one is counted and its
  seconds are written with the next one, so none is lost while the process
  lives (a surplus slot's seconds are not the pool's and are dropped).
  :meth:`Heartbeat.close_ledger` writes the last ones at a stop.
- while it holds its lease, a beat at most every ``SWEEP_INTERVAL_MS`` also
  starts SWEEP (layout.py) beside the beats: pool-wide one slot a period counts
  the results that expired unread, into ``apipool_results_expired_unread_total``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .layout import SWEEP_INTERVAL_MS
from .lease import Lease
from .ledger import Buckets, by_minute, merge_buckets
from .metrics import SlotMetrics
from .redis_checks import EvictionGuard, error_kind, exception_text
from .slot_time import SlotTime
from .waiting import wait_event

log = logging.getLogger("apipool.slot")


class Heartbeat:
    def __init__(
        self,
        lease: Lease,
        r: aioredis.Redis,
        interval: float,
        *,
        metrics: SlotMetrics | None = None,
        parent_pid: int | None = None,
        on_orphaned: Callable[[], None] | None = None,
        eviction: EvictionGuard | None = None,
        clock: Callable[[], float] = time.monotonic,
        slot_time: SlotTime | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.lease = lease
        self.r = r
        self.interval = interval
        self.metrics = metrics
        self.parent_pid = parent_pid
        self.on_orphaned = on_orphaned
        self.eviction = eviction
        self._clock = clock
        self.last_tick = clock()
        self.redis_ok = False
        self.refused: str | None = None
        """Why Redis refused the latest beat (a permanent error); None when it did not."""
        self._changed = asyncio.Event()
        self._orphaned = False
        self.slot_time = slot_time
        self._wall = wall
        self._pending: Buckets = {}
        """Ledger seconds not written yet: {minute: {state: seconds}}."""
        self._ledger_task: asyncio.Task[bool] | None = None
        self.ledger_failures = 0
        self._ledger_ok = True
        """Ledger writes that failed (their seconds went with a later write)."""
        self._sweep_task: asyncio.Task[None] | None = None
        self._swept_at: float | None = None

    def since_tick(self) -> float:
        """Seconds since the latest beat started."""
        return self._clock() - self.last_tick

    async def beat(self) -> None:
        """One beat: keep or get the lease, read the pool's size, check the memory
        policy when due; Redis errors are recorded in ``redis_ok`` and ``refused``,
        never raised."""
        was_held = self.lease.held
        try:
            await self.lease.refresh(self.r)
            await self.lease.check_pool_size(self.r)
            self.redis_ok, self.refused = True, None
        except RedisError as exc:
            self._failed(exc)
        if self.eviction is not None and self.redis_ok:
            await self.eviction.maybe_check(self.r)
        if self.metrics is not None:
            if was_held and not self.lease.held:
                self.metrics.lease_losses.inc()
            self.metrics.lease_held.set(1 if self.lease.valid_for(0) else 0)
        self._account()
        self._maybe_sweep()
        self._changed.set()

    # -- results that expired unread -------------------------------------------------

    def _maybe_sweep(self) -> None:
        """Start a SWEEP beside the beats when this slot's turn may have come."""
        now = self._clock()
        due = self._swept_at is None or now - self._swept_at >= SWEEP_INTERVAL_MS / 1000
        idle = self._sweep_task is None or self._sweep_task.done()
        if due and idle and self.redis_ok and self.refused is None and self.lease.valid_for(0):
            self._swept_at = now
            self._sweep_task = asyncio.create_task(self._sweep(), name="sweep")

    async def _sweep(self) -> None:
        try:
            counted = await self.lease.proto.sweep(now_ms=int(self._wall() * 1000)).arun(self.r)
        except RedisError as exc:  # counted by the next sweep that gets through
            log.debug("sweeping results that expired unread failed: %s", exception_text(exc))
            return
        if counted > 0:
            log.info("%d result(s) expired unread", counted)
            if self.metrics is not None:
                self.metrics.expired_unread.inc(counted)

    # -- the ledger ------------------------------------------------------------------

    def _account(self) -> None:
        """Tell the slot's time whether it is fenced, and start a ledger write."""
        if self.slot_time is None:
            return
        usable = self.redis_ok and self.refused is None and self.lease.valid_for(0)
        self.slot_time.fence(not usable)
        self._take_seconds()
        if self._ledger_task is None or self._ledger_task.done():
            self._ledger_task = asyncio.create_task(self._write_ledger(), name="ledger")

    def _take_seconds(self) -> None:
        if self.slot_time is None:
            return
        deltas = self.slot_time.take_deltas()
        if self.lease.surplus:
            return  # beyond the pool's size: not the pool's capacity
        merge_buckets(self._pending, by_minute(deltas, self._wall()))

    async def _write_ledger(self) -> bool:
        """Write every pending second in one step; on a Redis error keep them."""
        if not self._pending:
            return True
        batch, self._pending = self._pending, {}
        try:
            await self.lease.proto.ledger(batch).arun(self.r)
        except RedisError as exc:
            merge_buckets(self._pending, batch)
            self.ledger_failures += 1
            if self.metrics is not None:  # not in redis_errors: those are the work's steps
                self.metrics.ledger_errors.inc()
            level = logging.WARNING if self._ledger_ok else logging.DEBUG
            log.log(level, "ledger write failed (kept for the next): %s", exception_text(exc))
            self._ledger_ok = False
            return False
        self._ledger_ok = True
        return True

    async def close_ledger(self) -> bool:
        """At a stop, after :meth:`run` ended: write the seconds up to now."""
        if self._ledger_task is not None:
            await asyncio.gather(self._ledger_task, return_exceptions=True)
        if self._sweep_task is not None:
            await asyncio.gather(self._sweep_task, return_exceptions=True)
        self._take_seconds()
        written = await self._write_ledger()
        if self.slot_time is not None:
            totals = self.slot_time.totals()
            log.info(
                "slot %d accounted %.3f s: %s%s",
                self.lease.slot,
                sum(totals.values()),
                " ".join(f"{state}={seconds:.3f}" for state, seconds in totals.items()),
                "" if written else " (the last seconds could not be written to the ledger)",
            )
        return written

    def _failed(self, exc: RedisError) -> None:
        text = exception_text(exc)
        if error_kind(exc) == "transient":
            if self.redis_ok:
                log.warning("redis unreachable at heartbeat: %s", text)
            self.redis_ok, self.refused = False, None
            return
        refused = f"redis refused the heartbeat: {text}"
        if refused != self.refused:
            log.error("%s", refused)
        if self.metrics is not None:
            self.metrics.redis_error("permanent")
        # Redis answers, with an error: /readyz says which rather than "unreachable".
        self.redis_ok, self.refused = True, refused

    def _watch_parent(self) -> None:
        parent = self.parent_pid
        if parent is None or self._orphaned or os.getppid() == parent:
            return
        self._orphaned = True
        log.warning("supervisor (pid %d) is gone; stopping", parent)
        if self.on_orphaned is not None:
            self.on_orphaned()

    async def run(self) -> None:
        """Beat until cancelled."""
        task = asyncio.current_task()
        while True:
            started = self._clock()
            self.last_tick = started
            self._watch_parent()
            await self.beat()
            if task is not None and task.cancelling():
                # redis-py can turn a cancel that lands inside a command into a
                # RedisError, which beat() takes for an outage: honour it.
                raise asyncio.CancelledError
            await asyncio.sleep(max(0.0, self.interval - (self._clock() - started)))

    async def wait_change(self, timeout: float) -> None:
        """Return after the next beat or wake(), or after ``timeout`` seconds."""
        self._changed.clear()
        await wait_event(self._changed, timeout)

    def wake(self) -> None:
        """Wake every task in wait_change (a stop began)."""
        self._changed.set()
