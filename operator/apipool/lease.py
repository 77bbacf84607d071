"""The lease of one slot: whether this process may call the API as slot ``i``, and how long.

A :class:`Lease` is one process's view of ``apipool:{P}:lease:<i>`` (see
layout.py); every change to the key goes through :class:`~apipool.protocol.PoolProtocol`.

Guarantees:

- it never overstates the lease: validity is counted from the moment the
  acquire or renew that granted it was *sent*, on the injected clock, so a
  late reply only shortens the time this process believes it has;
- :attr:`Lease.epoch` changes at every acquisition, so work begun under one
  grant can tell that the lease was lost (and maybe someone else's) since;
- a slot whose index is at or beyond the pool's published size (``slots`` in
  the config hash) is *surplus*: :meth:`Lease.valid_for` is then False whatever
  Redis says, so a process that outlived a scale-down calls nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis

from .protocol import LeaseAnswer, LeaseCode, PoolProtocol

log = logging.getLogger("apipool.slot")

Clock = Callable[[], float]


class Lease:
    """Slot ``slot``'s lease, held as ``<owner>/<incarnation>`` for ``ttl`` seconds a grant.

    Not safe for concurrent use: one task (the heartbeat) refreshes it, any
    task may read it.
    """

    def __init__(
        self,
        proto: PoolProtocol,
        slot: int,
        owner: str,
        ttl: float,
        *,
        clock: Clock = time.monotonic,
        incarnation: str | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
        self.proto = proto
        self.slot = slot
        self.owner = owner
        self.ttl = ttl
        self.token = f"{owner}/{incarnation or uuid.uuid4().hex}"
        self._clock = clock
        self._held = False
        self._valid_until = 0.0
        self._epoch = 0
        self._surplus = False
        self._waiting_logged = False

    # -- what this process may assume ------------------------------------------

    @property
    def held(self) -> bool:
        """Redis granted it and no renewal has found it gone since (it may have run out)."""
        return self._held

    @property
    def epoch(self) -> int:
        """How many times the lease was acquired by this process; 0 before the first."""
        return self._epoch

    @property
    def surplus(self) -> bool:
        """The slot index is at or beyond the pool's published size (last read)."""
        return self._surplus

    def remaining(self) -> float:
        """Seconds the lease is certainly still ours; 0 when not held."""
        return max(0.0, self._valid_until - self._clock()) if self._held else 0.0

    def valid_for(self, seconds: float) -> bool:
        """True only while held, not surplus, and certainly ours for more than ``seconds``."""
        return self._held and not self._surplus and self._valid_until - self._clock() > seconds

    # -- steps -------------------------------------------------------------------

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    async def acquire(self, r: aioredis.Redis) -> LeaseAnswer:
        """Take the lease when free, keep it when ours, take it over from a dead
        predecessor of the same owner; else leave it to its holder."""
        sent = self._clock()
        step = self.proto.acquire(self.slot, self.token, self.owner, self._ttl_ms)
        answer = await step.arun(r)
        if not answer.held:
            if not self._waiting_logged:
                self._waiting_logged = True
                log.info(
                    "slot %d is held by %s for up to %d ms more; waiting",
                    self.slot,
                    answer.holder,
                    answer.pttl_ms,
                )
            return answer
        if not self._held or answer.code != LeaseCode.KEPT:
            self._epoch += 1
            self._waiting_logged = False
            if answer.code == LeaseCode.TAKEN_OVER:
                log.info(
                    "slot %d: took over the lease of dead predecessor %s", self.slot, answer.holder
                )
            else:
                log.info("slot %d: lease acquired", self.slot)
        self._held = True
        self._valid_until = sent + self.ttl
        return answer

    async def renew(self, r: aioredis.Redis) -> bool:
        """Extend a held lease; False (and no longer held) once it is gone or taken.
        A Redis error propagates and leaves the lease running out as it was."""
        if not self._held:
            return False
        sent = self._clock()
        if await self.proto.renew(self.slot, self.token, self._ttl_ms).arun(r):
            self._valid_until = sent + self.ttl
            return True
        self._lose("the lease was gone or taken at renewal")
        return False

    async def refresh(self, r: aioredis.Redis) -> bool:
        """One heartbeat's worth: renew when held, else try to acquire; whether held after."""
        if self._held:
            return await self.renew(r)
        return (await self.acquire(r)).held

    async def release(self, r: aioredis.Redis) -> bool:
        """Give the lease up: no longer held here from the start of the call; in
        Redis it is deleted only while it still holds our token (True then)."""
        if not self._held:
            return False
        self._held = False
        self._valid_until = 0.0
        released = await self.proto.release(self.slot, self.token).arun(r)
        log.info("slot %d: lease released", self.slot)
        return released

    async def check_pool_size(self, r: aioredis.Redis) -> bool:
        """Read the pool's published size; whether this slot is surplus now."""
        raw = await r.hget(self.proto.keys.config, "slots")
        size = int(raw) if raw is not None else None
        surplus = size is not None and self.slot >= size
        if surplus and not self._surplus:
            log.warning("slot %d is beyond the pool's %s slots; not calling", self.slot, size)
        self._surplus = surplus
        return surplus

    def _lose(self, why: str) -> None:
        self._held = False
        self._valid_until = 0.0
        log.warning("slot %d: lease lost (%s); not calling until it is back", self.slot, why)
