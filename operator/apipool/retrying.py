"""Steps a slot must get into Redis: retried by the kind of error Redis gave.

Guarantees of :class:`Retrier`:

- a step that fails with a transient error (see
  :func:`~apipool.redis_checks.error_kind`) is retried at once, then after a
  back-off doubling up to one second, until Redis takes it;
- a step that fails with a permanent error is logged (redacted) and counted
  (``apipool_redis_errors_total{kind="permanent"}``); its fallback, when it has
  one (e.g. dead-letter the job in a minimal step), is tried once a round; while
  both are refused :attr:`Retrier.refused` says why (``/readyz``) and the step is
  tried again every :data:`~apipool.redis_checks.REFUSED_RETRY` seconds, never
  in a tight loop;
- a refusal lasts until Redis takes the step it refused (or its fallback);
  :attr:`Retrier.refused` says the first refusal that lasts;
- once a stop began, a transient failure is given up when the stop has lasted
  the shutdown grace, a permanent one at once: the job stays where it is (in
  flight) for the next incarnation to recover.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from redis.exceptions import RedisError

from .metrics import SlotMetrics
from .redis_checks import REFUSED_RETRY, ErrorKind, error_kind, exception_text
from .waiting import wait_event

log = logging.getLogger("apipool.slot")
T = TypeVar("T")

FIRST_DELAY = 0.05
"""Seconds before the first retry after a transient error; it doubles up to MAX_DELAY."""
MAX_DELAY = 1.0


class Retrier:
    """Runs steps until Redis takes them; see the module docstring."""

    def __init__(
        self,
        *,
        stopping: asyncio.Event,
        grace: float,
        metrics: SlotMetrics | None = None,
        redact: Iterable[str] = (),
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.stopping = stopping
        self.grace = grace
        self.metrics = metrics
        self.redact = tuple(redact)
        self.on_error = on_error
        """Called at every failed try (a script's reply may have been lost)."""
        self.refused_retry = REFUSED_RETRY
        self._refusals: dict[str, str] = {}
        self._logged: set[str] = set()

    @property
    def refused(self) -> str | None:
        """Why Redis refuses this slot's steps (a permanent error), None while it does not."""
        return next(iter(self._refusals.values()), None)

    def note(self, what: str, exc: RedisError) -> ErrorKind:
        """Log and count a failed ``what``; a permanent error sets :attr:`refused`."""
        kind = error_kind(exc)
        if self.metrics is not None:
            self.metrics.redis_error(kind)
        text = exception_text(exc, self.redact)
        if kind == "transient":
            log.warning("%s failed (%s); retrying", what, text)
            return kind
        refused = f"redis refused {what}: {text}"
        if refused not in self._logged:  # once each while refused, then quieter
            self._logged.add(refused)
            log.error("%s; retrying every %g s", refused, self.refused_retry)
        else:
            log.warning("%s, again; retrying in %g s", refused, self.refused_retry)
        self._refusals[what] = refused
        return kind

    def taken(self, what: str) -> None:
        """Redis took step ``what``: a refusal of it is over."""
        if self._refusals.pop(what, None) is not None and not self._refusals:
            log.info("redis takes this slot's steps again")
            self._logged.clear()

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when a stop begins meanwhile."""
        await wait_event(self.stopping, seconds)

    async def run(
        self,
        what: str,
        op: Callable[[], Awaitable[T]],
        *,
        fallback: Callable[[str], Awaitable[T]] | None = None,
    ) -> T | None:
        """Run ``op`` until Redis takes it (or ``fallback``, given the refusal's
        reason, after a permanent error); None once a stop gave up on it."""
        delay = FIRST_DELAY
        give_up_at: float | None = None
        while True:
            try:
                answer = await op()
            except RedisError as exc:
                self.on_error()
                kind = self.note(what, exc)
            else:
                self.taken(_fallback_of(what))
                self.taken(what)
                return answer
            if kind == "permanent" and fallback is not None:
                instead = await self._fall_back(what, fallback)
                if instead is not None:
                    return instead
            if self.stopping.is_set():
                give_up_at = give_up_at or time.monotonic() + self.grace
                if kind == "permanent" or time.monotonic() > give_up_at:
                    log.error("%s: giving up at shutdown; the job stays in flight", what)
                    return None
            if kind == "permanent":
                await self.pause(self.refused_retry)
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)

    async def _fall_back(self, what: str, fallback: Callable[[str], Awaitable[T]]) -> T | None:
        reason = self._refusals.get(what, f"redis refused {what}")
        instead = _fallback_of(what)
        try:
            answer = await fallback(reason)
        except RedisError as exc:
            self.on_error()
            self.note(instead, exc)
            return None
        log.warning("%s was refused; the fallback was taken instead", what)
        self.taken(instead)
        self.taken(what)
        return answer


def _fallback_of(what: str) -> str:
    """The name a step's fallback is logged and refused under."""
    return f"{what} (the minimal fallback)"
