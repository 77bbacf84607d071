"""The typed calling conventions of a pool's Redis protocol.

``layout.py`` documents the keys and holds the Lua sources; this module is the
only code that runs them. Each atomic step is a method of :class:`PoolProtocol`
that returns a :class:`Step`: the script, its KEYS and ARGV in the order the
script's header gives, and a parser for its reply. A step runs on a blocking
client (``step.run(r)``: producers, the operator, stats) or an asyncio client
(``await step.arun(r)``: the slot, the test harness)::

    proto = PoolProtocol("billing")
    answer = proto.submit([envelope_json]).run(redis_client)
    finished = await proto.complete(0, raw, ...).arun(async_client)

:class:`Outcome` is the one vocabulary of what became of a job: the counters in
the stats hash, the slot's metrics, the result record's ``status`` and the
dead-letter entries all use its values.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from . import defaults, layout
from .layout import PoolKeys

T = TypeVar("T")
Arg = str | bytes | int | float

__all__ = [
    "RESULT_STATUSES",
    "CancelCode",
    "FinishCode",
    "Finished",
    "LeaseAnswer",
    "LeaseCode",
    "Outcome",
    "PoolKeys",
    "PoolProtocol",
    "Script",
    "Step",
    "SubmitAnswer",
    "Taken",
]


class Outcome(enum.StrEnum):
    """What became of a job when a slot (or the operator) was done with it."""

    OK = "ok"
    """The call succeeded; the result record holds its return value."""
    EXPIRED = "expired"
    """The deadline passed before a call could start; nothing was called."""
    DEAD = "dead"
    """Dead-lettered: malformed, unknown handler, or out of attempts."""
    RETRIED = "retried"
    """An attempt failed; the job went back to the queue with attempt + 1."""
    RECOVERED = "recovered"
    """Found in flight of a holder that is gone; queued again with attempt + 1."""
    THROTTLED = "throttled"
    """The API said "slow down" (429, ...): back at the head of the queue, the
    same attempt, not called again before its ``not_before``."""


RESULT_STATUSES = frozenset({Outcome.OK, Outcome.EXPIRED, Outcome.DEAD})
"""The outcomes a result record can carry (the others send the job round again)."""


@dataclass(frozen=True)
class Script:
    """A Lua script, run by its SHA1 and loaded on first use."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


SUBMIT = Script("submit", layout.SUBMIT_SCRIPT)
TAKE = Script("take", layout.TAKE_SCRIPT)
TAKE_AHEAD = Script("take_ahead", layout.TAKE_AHEAD_SCRIPT)
DROP = Script("drop", layout.DROP_SCRIPT)
ACQUIRE = Script("acquire", layout.ACQUIRE_SCRIPT)
RENEW = Script("renew", layout.RENEW_SCRIPT)
RELEASE = Script("release", layout.RELEASE_SCRIPT)
COMPLETE = Script("complete", layout.COMPLETE_SCRIPT)
REQUEUE = Script("requeue", layout.REQUEUE_SCRIPT)
LEDGER = Script("ledger", layout.LEDGER_SCRIPT)
THROTTLE = Script("throttle", layout.THROTTLE_SCRIPT)
SIGNALS = Script("signals", layout.SIGNALS_SCRIPT)
CANCEL = Script("cancel", layout.CANCEL_SCRIPT)
SWEEP = Script("sweep", layout.SWEEP_SCRIPT)
SCRIPTS = (
    SUBMIT, TAKE, TAKE_AHEAD, DROP, ACQUIRE, RENEW, RELEASE, COMPLETE, REQUEUE, LEDGER,
    THROTTLE, SIGNALS, CANCEL, SWEEP,
)  # fmt: skip


@dataclass(frozen=True)
class Step(Generic[T]):
    """One atomic step: a script with its KEYS and ARGV, and its reply's parser."""

    script: Script
    keys: tuple[str, ...]
    args: tuple[Arg, ...]
    parse: Callable[[Any], T]

    def run(self, r: redis.Redis) -> T:
        """Run on a blocking client; Redis errors propagate as redis-py raises them."""
        n = len(self.keys)
        try:
            reply = r.evalsha(self.script.sha, n, *self.keys, *self.args)
        except NoScriptError:
            reply = r.eval(self.script.source, n, *self.keys, *self.args)
        return self.parse(reply)

    async def arun(self, r: aioredis.Redis) -> T:
        """Run on an asyncio client."""
        n = len(self.keys)
        try:
            reply = await cast(Any, r.evalsha(self.script.sha, n, *self.keys, *self.args))
        except NoScriptError:
            reply = await cast(Any, r.eval(self.script.source, n, *self.keys, *self.args))
        return self.parse(reply)


@dataclass(frozen=True)
class SubmitAnswer:
    accepted: bool
    """False: the batch would pass max_queue_length; nothing was pushed."""
    depth: int
    """Queue length after the push (accepted) or as it was (refused)."""


class LeaseCode(enum.IntEnum):
    REFUSED = 0
    """Held by another owner; see holder and pttl_ms."""
    ACQUIRED = 1
    """The lease was free and is ours now."""
    KEPT = 2
    """It was ours already; renewed."""
    TAKEN_OVER = 3
    """Held by a dead predecessor of the same owner; ours now."""


@dataclass(frozen=True)
class LeaseAnswer:
    code: LeaseCode
    holder: str
    """The holder before the call (ours, the predecessor's, or another's token)."""
    pttl_ms: int

    @property
    def held(self) -> bool:
        return self.code != LeaseCode.REFUSED


class FinishCode(enum.IntEnum):
    GONE = 0
    """The envelope was no longer in the in-flight list: nothing written."""
    DONE = 1
    """The outcome was written (or the job requeued)."""
    WRONG_TYPE = -1
    """The result key holds something other than a list: nothing changed."""


@dataclass(frozen=True)
class Finished:
    code: FinishCode
    next: bytes | None = None
    """The next job, moved queue -> in-flight in the same step when asked."""
    skipped: int = 0
    """Over-limit envelopes dead-lettered inside Redis while taking the next job."""


@dataclass(frozen=True)
class Taken:
    job: bytes | None
    """The envelope now in the slot's in-flight list; None: the queue was empty."""
    skipped: int = 0
    """Over-limit envelopes dead-lettered inside Redis (never sent to the slot)."""


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Signals:
    """What a slot must honour before its next call (THROTTLE and SIGNALS reply it)."""

    effective: int
    """The pool's effective concurrency: slots at or above this index are parked."""
    pause_ms: int
    """Milliseconds left of a pool-wide pause (0: none)."""
    slots: int = 0
    """N as the config says (0: it does not say)."""


@dataclass(frozen=True)
class Throttled:
    code: FinishCode
    """DONE: back at the head of the queue; GONE: no longer ours, nothing done."""
    signals: Signals


def _signals(reply: Any) -> Signals:
    effective, pause_ms, slots = reply
    return Signals(int(effective), int(pause_ms), int(slots))


def _throttled(reply: Any) -> Throttled:
    code, effective, pause_ms = reply
    return Throttled(FinishCode(int(code)), Signals(int(effective), int(pause_ms)))


def _submit_answer(reply: Any) -> SubmitAnswer:
    n = int(reply)
    return SubmitAnswer(True, n) if n >= 0 else SubmitAnswer(False, -1 - n)


def _lease_answer(reply: Any) -> LeaseAnswer:
    code, holder, pttl = reply
    return LeaseAnswer(LeaseCode(int(code)), _text(holder), int(pttl))


def _finished(reply: Any) -> Finished:
    code, nxt, skipped = reply
    return Finished(FinishCode(int(code)), cast(bytes | None, nxt), int(skipped))


def _taken(reply: Any) -> Taken:
    job, skipped = reply
    return Taken(cast(bytes | None, job), int(skipped))


def _flag(reply: Any) -> bool:
    return bool(int(reply))


class CancelCode(enum.IntEnum):
    REMOVED = 1
    """The job was in the queue and is removed (counted ``cancelled``)."""
    ABSENT = 0
    """Not in the queue: taken by a slot, done, or never submitted."""
    BEYOND_SCAN = -1
    """Not among the envelopes scanned; the queue is longer than the scan."""


def _cancelled(reply: Any) -> CancelCode:
    return CancelCode(int(reply))


@dataclass(frozen=True)
class PoolProtocol:
    """The atomic steps on pool ``pool``'s keys (see layout.py for each script)."""

    pool: str
    max_envelope_bytes: int = defaults.MAX_ENVELOPE_BYTES
    """Envelopes over this size are dead-lettered inside Redis when taken."""
    max_dead_letters: int = defaults.MAX_DEAD_LETTERS
    """Every step that adds a dead letter trims the list to this many (0: no cap)."""
    keys: PoolKeys = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", PoolKeys(self.pool))

    # -- rules ----------------------------------------------------------------

    def result_key(self, job_id: str | None, reply_to: str | None = None) -> str | None:
        """Where a job's outcome goes: its ``reply_to`` list, else its result key;
        None when neither is known (an envelope whose id cannot be read)."""
        if reply_to:
            return reply_to
        return self.keys.result(job_id) if job_id else None

    def _take_args(self, slot: int) -> tuple[Arg, ...]:
        """The ARGV tail of every step that may take a job (see _TAKE_LUA)."""
        return (self.max_envelope_bytes, self.max_dead_letters, slot, round(time.time(), 3))

    def reply_to_problem(self, reply_to: str | None) -> str | None:
        """Why a job's ``reply_to`` is refused, or None when it is acceptable."""
        if reply_to is not None and not reply_to.startswith(self.keys.reply_prefix):
            return f"reply_to must be a key under {self.keys.reply_prefix!r}"
        return None

    # -- steps ----------------------------------------------------------------

    def submit(self, envelopes: Sequence[str | bytes]) -> Step[SubmitAnswer]:
        """Push a batch, all or none, unless it would pass max_queue_length."""
        k = self.keys
        return Step(SUBMIT, (k.queue, k.config, k.stats), tuple(envelopes), _submit_answer)

    def take(self, slot: int) -> Step[Taken]:
        """Move one job queue -> slot's in-flight list without blocking; an
        over-limit envelope is dead-lettered in Redis and never sent."""
        k = self.keys
        keys = (k.queue, k.inflight(slot), k.dead, k.stats)
        return Step(TAKE, keys, self._take_args(slot), _taken)

    def take_ahead(self, slot: int) -> Step[Taken]:
        """TAKE while a call runs: only when the queue holds at least N jobs (no
        slot left waiting) and only one ahead (see AHEAD in layout.py)."""
        k = self.keys
        keys = (k.queue, k.inflight(slot), k.dead, k.stats, k.config)
        return Step(TAKE_AHEAD, keys, self._take_args(slot), _taken)

    def drop_oversize(self, slot: int) -> Step[int]:
        """Remove every over-limit envelope from slot's in-flight list and
        dead-letter it by size and SHA-1, inside Redis; the number removed."""
        k = self.keys
        keys = (k.inflight(slot), k.dead, k.stats)
        return Step(DROP, keys, self._take_args(slot), int)

    def acquire(self, slot: int, token: str, owner: str, ttl_ms: int) -> Step[LeaseAnswer]:
        """Take slot ``slot``'s lease (free, ours, or a dead predecessor's of ``owner``)."""
        return Step(ACQUIRE, (self.keys.lease(slot),), (token, f"{owner}/", ttl_ms), _lease_answer)

    def renew(self, slot: int, token: str, ttl_ms: int) -> Step[bool]:
        """Extend the lease while it still holds ``token``; False once it is not ours."""
        return Step(RENEW, (self.keys.lease(slot),), (token, ttl_ms), _flag)

    def release(self, slot: int, token: str) -> Step[bool]:
        """Delete the lease while it still holds ``token``."""
        return Step(RELEASE, (self.keys.lease(slot),), (token,), _flag)

    def complete(
        self,
        slot: int,
        raw: bytes,
        *,
        result_key: str | None,
        record: str,
        ttl_ms: int,
        outcome: Outcome,
        busy_ms: int = 0,
        dead_entry: str = "",
        take_next: bool = False,
        unread: str | None = None,
    ) -> Step[Finished]:
        """Write a job's one outcome if (and only if) it is still in slot's
        in-flight list; the result record only when ``result_key`` is known.
        ``unread``: the job id to add to the pool's unread set along with the
        record, scored by the record's expiry (SWEEP counts it unless read); the
        unread set is named among the keys only then (a slot whose ACL lacks it
        can still dead-letter)."""
        k = self.keys
        tracked = (k.unread,) if unread else ()
        return Step(
            COMPLETE,
            (k.inflight(slot), result_key or k.dead, k.stats, k.dead, k.queue, *tracked),
            (
                raw,
                record,
                ttl_ms,
                outcome.value,
                busy_ms,
                dead_entry,
                "1" if take_next else "",
                "1" if result_key else "",
                *self._take_args(slot),
                unread or "",
                round(time.time() * 1000) + ttl_ms,
            ),
            _finished,
        )

    def requeue(
        self,
        slot: int,
        raw: bytes,
        new_raw: str | bytes,
        *,
        front: bool,
        outcome: Outcome | None,
        take_next: bool = False,
    ) -> Step[Finished]:
        """Move a job from slot's in-flight list back to the queue (front: taken next)."""
        k = self.keys
        return Step(
            REQUEUE,
            (k.inflight(slot), k.queue, k.stats, k.dead),
            (
                raw,
                new_raw,
                "front" if front else "back",
                outcome.value if outcome is not None else "",
                "1" if take_next else "",
                *self._take_args(slot),
            ),
            _finished,
        )

    def throttle(
        self,
        slot: int,
        raw: bytes,
        again: str,
        *,
        pause_ms: int,
        pause_until: float,
        adapt: bool,
        now_ms: int,
    ) -> Step[Throttled]:
        """The API said "slow down" to job ``raw``: back to the head of the queue as
        ``again``; pause the pool ``pause_ms``, or (0: no pause) with ``adapt``
        use one slot fewer (THROTTLE in layout.py)."""
        k = self.keys
        return Step(
            THROTTLE,
            (k.inflight(slot), k.queue, k.stats, k.pause, k.effective, k.adapt, k.config),
            (raw, again, pause_ms, repr(round(pause_until, 3)), "1" if adapt else "0", now_ms),
            _throttled,
        )

    def signals(self, *, adapt: bool, probe_ms: int, now_ms: int) -> Step[Signals]:
        """The pause and the effective concurrency; with ``adapt``, one step up
        once ``probe_ms`` passed without a 429 (SIGNALS in layout.py)."""
        k = self.keys
        return Step(
            SIGNALS,
            (k.pause, k.effective, k.adapt, k.config),
            (now_ms, probe_ms, "1" if adapt else "0"),
            _signals,
        )

    def ledger(
        self, buckets: Mapping[int, Mapping[str, float]], *, ttl: int = layout.LEDGER_TTL_SECONDS
    ) -> Step[int]:
        """Add seconds per state to the ledger bucket of each minute, in one step
        (LEDGER in layout.py): ``{minute: {state: seconds}}``; returns the buckets written."""
        k = self.keys
        minutes = sorted(buckets)
        args: list[Arg] = [ttl]
        for number, minute in enumerate(minutes, start=1):
            for state, seconds in sorted(buckets[minute].items()):
                args += [number, state, repr(float(seconds))]
        keys = (k.config, *(k.ledger(m) for m in minutes))
        return Step(LEDGER, keys, tuple(args), int)

    def cancel(
        self, job_id: str, envelope: str | bytes = "", *, scan: int = layout.CANCEL_SCAN
    ) -> Step[CancelCode]:
        """Remove job ``job_id`` from the queue if it is there: by its exact
        ``envelope`` when known, else by a scan of at most ``scan`` envelopes
        from the end slots take from (CANCEL in layout.py)."""
        k = self.keys
        return Step(CANCEL, (k.queue, k.stats), (job_id, envelope, max(0, scan)), _cancelled)

    def sweep(
        self,
        *,
        now_ms: int,
        interval_ms: int = layout.SWEEP_INTERVAL_MS,
        limit: int = layout.SWEEP_LIMIT,
    ) -> Step[int]:
        """Count results that expired unread into ``expired_unread``, at most
        once per ``interval_ms`` pool-wide; -1 when another sweep ran meanwhile
        (SWEEP in layout.py)."""
        k = self.keys
        return Step(SWEEP, (k.unread, k.stats, k.sweep), (now_ms, interval_ms, limit), int)
