"""What a slot makes of Redis's errors, and whether Redis may evict the pool's keys.

- :func:`error_kind`: a *transient* error (the connection broke or timed out,
  Redis is loading, busy, failing over or out of memory) goes away by itself,
  so the step is retried soon; a *permanent* one (``NOPERM``, ``WRONGTYPE``, a
  script error, ``CROSSSLOT``, ...) comes back however often it is retried, so
  the slot retries it only slowly and says why on ``/readyz``.
- :class:`EvictionGuard`: a Redis with ``maxmemory`` set and a policy other than
  ``noeviction`` may drop leases, in-flight lists and results under memory
  pressure; the slot then refuses to serve unless ``--allow-eviction`` was given.
  It reads ``INFO memory``, which works where ``CONFIG`` is disabled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.exceptions import RedisError

from .redact import redact_text

log = logging.getLogger("apipool.slot")

ErrorKind = Literal["transient", "permanent"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("transient", "permanent")

TRANSIENT_REPLIES = ("BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "LOADING")
"""Error replies of a Redis that will answer differently soon (a long script,
a failover, a restart); the other error replies are permanent."""

REFUSED_RETRY = 10.0
"""Seconds between two tries of a step that Redis refused (a permanent error)."""

EVICTION_CHECK_EVERY = 30.0
"""Seconds between two reads of ``INFO memory`` while Redis does not evict."""
EVICTION_RECHECK = 1.0
"""Seconds between two reads while the slot refuses to serve (it serves again soon)."""
NOT_CHECKED = "redis memory policy not checked yet"

MAX_TEXT = 2000
"""Characters kept of an error text in a log line, a dead letter or /readyz."""


def error_kind(exc: RedisError) -> ErrorKind:
    """Whether retrying ``exc``'s step soon may succeed (transient) or not (permanent)."""
    if isinstance(
        exc, rx.ConnectionError | rx.TimeoutError | rx.OutOfMemoryError | rx.ReadOnlyError
    ):
        return "transient"  # BusyLoadingError is a ConnectionError
    if isinstance(exc, rx.ResponseError):
        return "transient" if str(exc).startswith(TRANSIENT_REPLIES) else "permanent"
    return "permanent"  # a reply redis-py could not use, an argument it could not send


def exception_text(exc: BaseException, extra: Iterable[str] = ()) -> str:
    """``Type: message`` of any exception, redacted and cut to MAX_TEXT characters;
    an exception whose message cannot be had still gets its type named."""
    name = type(exc).__name__
    try:
        message = str(exc)
    except Exception:  # a hostile __str__
        message = "(message unavailable)"
    text = f"{name}: {message[: MAX_TEXT * 32]}" if message else name
    return clip(redact_text(text, extra))


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def may_evict(maxmemory: int, policy: str) -> bool:
    """The one rule (the slot's and the operator's): Redis may evict keys when
    it has a memory limit (or one that cannot be read: -1) and a policy other
    than noeviction."""
    return maxmemory != 0 and policy != "noeviction"


def eviction_problem(maxmemory: int, policy: str) -> str | None:
    """Why a Redis with these settings may evict keys, or None when it cannot."""
    if not may_evict(maxmemory, policy):
        return None
    return (
        f"redis may evict keys (maxmemory-policy {policy}): set noeviction or pass --allow-eviction"
    )


def memory_settings(info: Mapping[str, Any]) -> tuple[int, str]:
    """``maxmemory`` (-1 when unreadable) and ``maxmemory_policy`` of ``INFO memory``."""
    try:
        maxmemory = int(info.get("maxmemory", 0))
    except (TypeError, ValueError):
        maxmemory = -1  # unreadable: assume a limit, the policy decides
    return maxmemory, str(info.get("maxmemory_policy", "unknown"))


class EvictionGuard:
    """Whether the slot must refuse work because Redis may evict keys.

    :attr:`problem` is the reason to refuse (``/readyz`` says it), None while the
    slot may serve; it starts as :data:`NOT_CHECKED`. The heartbeat calls
    :meth:`maybe_check` every beat: Redis is read at once, then every
    ``every`` seconds, and every :data:`EVICTION_RECHECK` seconds while refusing.
    """

    def __init__(
        self,
        *,
        allow: bool,
        every: float = EVICTION_CHECK_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allow = allow
        self.every = every
        self._clock = clock
        self.problem: str | None = NOT_CHECKED
        self._next_at = clock()
        self._warned_allowed = False
        self._warned_unreadable = False

    async def maybe_check(self, r: aioredis.Redis) -> None:
        """Read ``INFO memory`` when a check is due; never raises a Redis error."""
        if self._clock() >= self._next_at:
            await self.check(r)

    async def check(self, r: aioredis.Redis) -> None:
        try:
            info = await r.info("memory")
        except RedisError as exc:
            if error_kind(exc) == "permanent":
                self._unreadable(exc)
            return  # transient: the next beat reads again; the verdict stands
        self.apply(eviction_problem(*memory_settings(info)))

    def apply(self, seen: str | None) -> None:
        """Take the verdict of one reading: log each change once, then schedule the next."""
        if seen is not None and self.allow:
            if not self._warned_allowed:
                self._warned_allowed = True
                log.warning("%s; serving anyway (--allow-eviction)", seen.split(":")[0])
            seen = None
        elif seen is not None and seen != self.problem:
            log.error("%s; this slot takes no work until then", seen)
        elif seen is None and self.problem not in (None, NOT_CHECKED):
            log.info("redis no longer evicts keys; serving again")
        self.problem = seen
        wait = EVICTION_RECHECK if seen is not None else self.every
        self._next_at = self._clock() + wait

    def _unreadable(self, exc: RedisError) -> None:
        if not self._warned_unreadable:
            self._warned_unreadable = True
            log.warning(
                "cannot read INFO memory (%s); whether redis may evict keys is not checked",
                exception_text(exc),
            )
        self.problem = None
        self._next_at = self._clock() + self.every
