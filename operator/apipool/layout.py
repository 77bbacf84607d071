"""The Redis key layout of a pool and every atomic step on it.

This module is the one place that names Redis keys and holds the Lua scripts;
``protocol.py`` is the only code that runs the scripts (typed, KEYS and ARGV in
the order each header below gives). Everything else goes through
:class:`PoolKeys` and :class:`apipool.protocol.PoolProtocol`.

Keys of pool ``P`` (the ``{P}`` hash tag would keep a pool on one Redis Cluster slot;
today's clients connect to one Redis endpoint, without Cluster or Sentinel discovery)
=====================================================================================

``apipool:{P}:queue``           LIST of job envelopes (JSON, see envelope.py).
                                Producers ``LPUSH``; slots take from the right,
                                so the list is FIFO. Retries after a failed call
                                go to the left (back of the line); jobs recovered
                                from a dead slot, or handed back unrun, go to the
                                right (front of the line).
``apipool:{P}:inflight:<i>``    LIST: the envelope slot ``i`` is working on (at
                                most one). Filled by ``BLMOVE queue inflight RIGHT
                                LEFT``; emptied only by COMPLETE or REQUEUE, so a
                                job is always in exactly one of: queue, one
                                in-flight list, its outcome.
``apipool:{P}:lease:<i>``       STRING ``<owner>/<incarnation>``, with a PX TTL.
                                The holder of slot ``i``. ``owner`` is stable for
                                what may restart the process (a pod UID, a local
                                supervisor's id); ``incarnation`` is unique per
                                process. Renewed by the slot's heartbeat.
``apipool:{P}:result:<id>``     LIST holding one result record (JSON), with a TTL
                                (``PEXPIRE``). Waiters read it without removing it
                                by ``BLMOVE key key RIGHT RIGHT timeout`` (a blocking
                                rotation of a one-element list), so any number of
                                readers, and a reader that retries, see it.
``apipool:{P}:reply:<name>``    LIST a job may name in ``reply_to`` instead of its
                                result key (e.g. one list for a batch). Only keys
                                under this prefix are accepted.
``apipool:{P}:dead``            LIST of dead-letter entries (JSON: id, reason,
                                envelope, slot, attempt, failed_at), newest left.
``apipool:{P}:stats``           HASH of counters: ``submitted`` (by the submit
                                script; a plain ``LPUSH`` producer is not counted),
                                one per :class:`apipool.protocol.Outcome`
                                (``ok``, ``expired``, ``dead``, ``retried``,
                                ``recovered``), ``busy_ms`` (handler time of
                                finished calls), ``cancelled`` (CANCEL),
                                ``expired_unread`` (SWEEP).
``apipool:{P}:pause``           STRING while the pool is paused because the API
                                sent Retry-After: the unix time it ends, with
                                a matching PX expiry (throttling.py).
``apipool:{P}:effective``       STRING: the pool's effective concurrency while
                                the API refuses calls below N (absent: N).
                                Slots with an index at or above it are parked.
``apipool:{P}:adapt``           STRING ``"<changed> <step> <ceiling>"``: unix ms
                                of the latest change of ``effective``, the next
                                increase, and the level last refused (0: none).
``apipool:{P}:config``          HASH of pool settings read by producers:
                                ``max_queue_length`` (0 or absent: unbounded),
                                ``slots`` (N, for stats).
``apipool:{P}:ledger:<minute>`` HASH: where the slots' time went in one minute
                                (``minute`` = unix time // 60): one float field
                                per slot-time state (seconds, summed over the
                                slots, see slot_time.py) and ``slots`` (N as the
                                config said at the latest write). Expires after
                                ``LEDGER_TTL`` (26 h). ``down`` is not written: a
                                reader computes it (ledger.py).
``apipool:{P}:unread``          ZSET of job ids whose ``ok`` result record at
                                its default result key nobody has read yet,
                                scored by the unix ms the record expires.
                                COMPLETE adds (O(log n)); a reader ZREMs on
                                reading; SWEEP counts the expired ones into
                                ``expired_unread``. One member per live ``ok``
                                result; the key expires 10 minutes after
                                the newest record would (a pool whose slots
                                are gone leaves nothing behind).
``apipool:{P}:sweep``           STRING with a PX expiry: the pool's latest
                                SWEEP ran less than ``SWEEP_INTERVAL_MS`` ago.

Atomic steps
============

SUBMIT     (script) reject the whole batch when the queue would pass
           ``max_queue_length``, else ``LPUSH`` it (in chunks of 1000
           arguments, one script: still all or nothing) and count it.
TAKE       (script) ``LMOVE queue inflight:<i> RIGHT LEFT`` without blocking.
           An envelope over the slot's size limit never leaves Redis: it is
           dead-lettered right there (by size and SHA-1, its body dropped) and
           the next one is taken (at most 16 such per call).
AHEAD      (script) TAKE, only while the queue holds at least as many jobs as
           the pool has slots (``config`` ``slots``) and the in-flight list
           holds at most the job being called: a slot prefetches its next job
           during a call, never more than one ahead, and never while another
           slot could be left waiting for work.
WAIT       ``BLMOVE queue inflight:<i> RIGHT LEFT`` (one command, atomic): the
           blocking take, used only after TAKE found the queue empty. What it
           returns reaches the slot whatever its size (bounded by Redis's
           ``proto-max-bulk-len``); the slot checks the size before parsing.
DROP       (script) remove every over-limit envelope from a slot's in-flight
           list and dead-letter it by size and SHA-1, all inside Redis: used
           after WAIT brought one, and before recovery reads the list, so an
           envelope too large to send back as an argument never strands a slot.
ACQUIRE    (script) take the lease when free, keep it when ours, take it over at
           once when its owner is ours (the predecessor is known dead: the same
           supervisor or pod only starts a process after the old one is gone).
RENEW      (script) extend the lease only while it still holds our token.
RELEASE    (script) delete the lease only while it still holds our token.
COMPLETE   (script) remove the exact envelope from the slot's in-flight list and,
           only if it was there, write the result (with TTL) when there is a
           result key, the dead-letter entry if any, and the counters. Whoever
           removes a job from in-flight writes its one outcome, so a job never
           gets two. Refuses, changing nothing, when the result key holds
           something other than a list. Optionally ends with TAKE: a busy slot
           finishes one job and gets the next in one round trip. Every key a
           script is passed is a real key of the pool (no empty names), so a
           key-restricted ACL and a Redis Cluster slot both hold.
DEAD LIST  every script that adds a dead letter trims the list to its newest
           ``max_dead_letters`` entries (0: no cap) and counts what it dropped
           in the stats hash's ``dead_trimmed``.
REQUEUE    (script) remove the exact envelope from in-flight and, only if it was
           there, push a (possibly rewritten) envelope back to the queue;
           optionally take the next job as COMPLETE does.
THROTTLE   (script) the API said "slow down": remove the exact envelope from
           in-flight and, only if it was there, push it back to the head of the
           queue (taken next; the same attempt, a ``not_before``), count it
           ``throttled``, pause the pool for a Retry-After (never shortening a
           longer pause), or, without one and with adaptation, lower
           ``effective`` by one.
SIGNALS    (script) read the pause and the effective concurrency; with
           adaptation, raise ``effective`` by ``step`` once no 429 has lowered
           it for the probe interval, doubling ``step`` (back to N: removed),
           but never past the level last refused until it has held at it for
           a probe interval (then one by one again).
LEDGER     (script) add a slot's seconds per state to one or more ledger
           buckets, set each bucket's ``slots`` from the config and its expiry,
           in one step: a heartbeat's deltas are written together.
CANCEL     (script) remove one job from the queue by its exact envelope (the
           client that submitted it remembers it; ``LREM``), else by its id:
           a scan of at most ``scan`` envelopes from the end slots take from,
           decoding only those that contain the id. Counted ``cancelled``.
           A job in flight or done is not touched.
SWEEP      (script) at most once per ``SWEEP_INTERVAL_MS`` pool-wide (a SET NX
           PX guard): move up to ``SWEEP_LIMIT`` expired members of ``unread``
           into the stats hash's ``expired_unread``; O(log n + moved).
"""

from __future__ import annotations

from dataclasses import dataclass

KEY_PREFIX = "apipool"

LEDGER_BUCKET_SECONDS = 60
"""Seconds of wall time one ledger bucket covers."""
LEDGER_TTL_SECONDS = 26 * 3600
"""Seconds a ledger bucket is kept after its latest write (a day, and slack)."""


def index_after(prefix: str, text: str) -> int | None:
    """The slot index that follows ``prefix`` in ``text`` (an in-flight key, a pod
    name), in its one canonical decimal form; None for anything else."""
    tail = text[len(prefix) :] if text.startswith(prefix) else ""
    return int(tail) if tail.isascii() and tail.isdigit() and str(int(tail)) == tail else None


@dataclass(frozen=True)
class PoolKeys:
    """Key names of one pool."""

    pool: str

    @property
    def base(self) -> str:
        return f"{KEY_PREFIX}:{{{self.pool}}}"

    @property
    def queue(self) -> str:
        return f"{self.base}:queue"

    @property
    def dead(self) -> str:
        return f"{self.base}:dead"

    @property
    def stats(self) -> str:
        return f"{self.base}:stats"

    @property
    def config(self) -> str:
        return f"{self.base}:config"

    def inflight(self, slot: int) -> str:
        return f"{self.base}:inflight:{slot}"

    def lease(self, slot: int) -> str:
        return f"{self.base}:lease:{slot}"

    def result(self, job_id: str) -> str:
        return f"{self.base}:result:{job_id}"

    @property
    def reply_prefix(self) -> str:
        return f"{self.base}:reply:"

    @property
    def inflight_pattern(self) -> str:
        return f"{self.base}:inflight:*"

    def slot_of(self, key: bytes | str) -> int | None:
        """The slot index of one of this pool's in-flight keys, else None."""
        text = key.decode(errors="replace") if isinstance(key, bytes) else key
        return index_after(f"{self.base}:inflight:", text)

    @property
    def lease_pattern(self) -> str:
        return f"{self.base}:lease:*"

    @property
    def pause(self) -> str:
        return f"{self.base}:pause"

    @property
    def effective(self) -> str:
        return f"{self.base}:effective"

    @property
    def adapt(self) -> str:
        return f"{self.base}:adapt"

    def ledger(self, minute: int) -> str:
        """The ledger bucket of ``minute`` (unix time // 60)."""
        return f"{self.base}:ledger:{minute}"

    @property
    def unread(self) -> str:
        return f"{self.base}:unread"

    @property
    def sweep(self) -> str:
        return f"{self.base}:sweep"


# KEYS[1] queue, KEYS[2] config, KEYS[3] stats
# ARGV    envelopes (JSON), pushed in order
# returns the queue length after the push, or -1 - current length when the
#         batch would pass max_queue_length (nothing pushed)
SUBMIT_SCRIPT = """
local limit = tonumber(redis.call('HGET', KEYS[2], 'max_queue_length') or '0') or 0
local depth = redis.call('LLEN', KEYS[1])
if limit > 0 and depth + #ARGV > limit then
  return -1 - depth
end
local n = depth
for i = 1, #ARGV, 1000 do
  n = redis.call('LPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HINCRBY', KEYS[3], 'submitted', #ARGV)
return n
"""

# Lua shared by TAKE, DROP, COMPLETE and REQUEUE (prepended to each script).
# trim_dead(dead, stats, max): keep the newest max dead letters, count the rest.
# bury(v, dead, stats, max_bytes, max_dead, slot, now): dead-letter an
#   over-limit envelope by its size and SHA-1 (its body is not kept).
# take(queue, inflight, dead, stats, max_bytes, max_dead, slot, now):
#   returns (envelope or false, number of over-limit envelopes dead-lettered).
_TAKE_LUA = """
local function trim_dead(dead, stats, max_dead)
  if max_dead > 0 then
    local n = redis.call('LLEN', dead)
    if n > max_dead then
      redis.call('LTRIM', dead, 0, max_dead - 1)
      redis.call('HINCRBY', stats, 'dead_trimmed', n - max_dead)
    end
  end
end
local function bury(v, dead, stats, max_bytes, max_dead, slot, now)
  local size = string.len(v)
  redis.call('LPUSH', dead, cjson.encode({
    id = cjson.null, attempt = cjson.null, slot = slot, failed_at = now,
    reason = 'envelope of ' .. size .. ' bytes is over the limit of ' .. max_bytes .. ' bytes',
    envelope = cjson.null, envelope_bytes = size, envelope_sha1 = redis.sha1hex(v)}))
  redis.call('HINCRBY', stats, 'dead', 1)
  trim_dead(dead, stats, max_dead)
end
local function take(queue, inflight, dead, stats, max_bytes, max_dead, slot, now)
  local skipped = 0
  while skipped < 16 do
    local v = redis.call('LMOVE', queue, inflight, 'RIGHT', 'LEFT')
    if not v then
      return false, skipped
    end
    if string.len(v) <= max_bytes then
      return v, skipped
    end
    redis.call('LPOP', inflight)
    bury(v, dead, stats, max_bytes, max_dead, slot, now)
    skipped = skipped + 1
  end
  return false, skipped
end
"""

# KEYS[1] queue, KEYS[2] inflight, KEYS[3] dead, KEYS[4] stats
# ARGV[1] max envelope bytes, ARGV[2] max dead letters (0: no cap), ARGV[3] slot,
# ARGV[4] now (unix seconds)
# returns {envelope or false, over-limit envelopes dead-lettered}
TAKE_SCRIPT = (
    _TAKE_LUA
    + """
local v, skipped = take(KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
return {v, skipped}
"""
)

# KEYS[1] queue, KEYS[2] inflight, KEYS[3] dead, KEYS[4] stats, KEYS[5] config
# ARGV as TAKE's; returns {envelope or false, over-limit envelopes dropped}
TAKE_AHEAD_SCRIPT = (
    _TAKE_LUA
    + """
local slots = tonumber(redis.call('HGET', KEYS[5], 'slots') or '') or 0
if slots < 1 or redis.call('LLEN', KEYS[1]) < slots or redis.call('LLEN', KEYS[2]) > 1 then
  return {false, 0}
end
local v, skipped = take(KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
return {v, skipped}
"""
)

# KEYS[1] lease
# ARGV[1] token "<owner>/<incarnation>", ARGV[2] owner prefix "<owner>/", ARGV[3] ttl ms
# returns {code, holder, pttl}: code 1 = acquired a free lease, 2 = already ours
#         (renewed), 3 = taken over from a dead predecessor of the same owner,
#         0 = held by someone else (holder and its remaining ttl returned)
ACQUIRE_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return {1, ARGV[1], tonumber(ARGV[3])}
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {2, cur, tonumber(ARGV[3])}
end
if string.sub(cur, 1, string.len(ARGV[2])) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return {3, cur, tonumber(ARGV[3])}
end
return {0, cur, redis.call('PTTL', KEYS[1])}
"""

# KEYS[1] lease; ARGV[1] token, ARGV[2] ttl ms
# returns 1 when extended, 0 when the lease is no longer ours
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS[1] lease; ARGV[1] token
# returns 1 when deleted, 0 when it was not ours
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS[1] inflight, KEYS[2] dead, KEYS[3] stats
# ARGV[1] max envelope bytes, ARGV[2] max dead letters (0: no cap), ARGV[3] slot,
# ARGV[4] now (unix seconds)
# returns the number of over-limit envelopes removed from the in-flight list and
#         dead-lettered (by size and SHA-1): an envelope too large to send back
#         as a script argument (over proto-max-bulk-len) is removed all the same
DROP_SCRIPT = (
    _TAKE_LUA
    + """
local max_bytes = tonumber(ARGV[1])
local dropped = 0
for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.len(v) > max_bytes then
    redis.call('LREM', KEYS[1], 1, v)
    bury(v, KEYS[2], KEYS[3], max_bytes, tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
    dropped = dropped + 1
  end
end
return dropped
"""
)

# KEYS[1] inflight, KEYS[2] result key (when ARGV[8] is '1'; else any key of the
#         pool, not written: the slot passes the dead list), KEYS[3] stats,
#         KEYS[4] dead, KEYS[5] queue, KEYS[6] unread (only when ARGV[13] names a job)
# ARGV[1] envelope exactly as taken, ARGV[2] result record (JSON),
# ARGV[3] result ttl ms, ARGV[4] outcome counter name, ARGV[5] busy ms,
# ARGV[6] dead-letter entry (JSON) or '', ARGV[7] '1': then take the next job,
# ARGV[8] '1': write the result record to KEYS[2], ARGV[9] max envelope bytes,
# ARGV[10] max dead letters (0: no cap), ARGV[11] slot, ARGV[12] now (unix s),
# ARGV[13] job id to add to unread with the record (or ''), ARGV[14] the
# record's expiry (unix ms, its score)
# returns {code, next, skipped}: code 1 when the outcome was written, 0 when the
#         job was no longer ours, -1 when the result key exists but is not a
#         list (nothing changed); next: the next envelope, taken as TAKE does
#         (only when asked and code is 1), else false; skipped: over-limit
#         envelopes TAKE dead-lettered meanwhile
COMPLETE_SCRIPT = (
    _TAKE_LUA
    + """
local write = ARGV[8] == '1'
if write then
  local kind = redis.call('TYPE', KEYS[2])['ok']
  if kind ~= 'none' and kind ~= 'list' then
    return {-1, false, 0}
  end
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return {0, false, 0}
end
if write then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  if ARGV[13] and ARGV[13] ~= '' then
    redis.call('ZADD', KEYS[6], ARGV[14], ARGV[13])
    redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[3]) + 600000)
  end
end
if ARGV[6] ~= '' then
  redis.call('LPUSH', KEYS[4], ARGV[6])
  trim_dead(KEYS[4], KEYS[3], tonumber(ARGV[10]))
end
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
if tonumber(ARGV[5]) > 0 then
  redis.call('HINCRBY', KEYS[3], 'busy_ms', ARGV[5])
end
if ARGV[7] == '1' then
  local v, skipped = take(KEYS[5], KEYS[1], KEYS[4], KEYS[3],
    tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]))
  return {1, v, skipped}
end
return {1, false, 0}
"""
)

# KEYS[1] inflight, KEYS[2] queue, KEYS[3] stats, KEYS[4] dead
# ARGV[1] envelope exactly as taken, ARGV[2] envelope to queue,
# ARGV[3] 'front' (RPUSH: taken next) or 'back' (LPUSH), ARGV[4] counter or '',
# ARGV[5] '1': then take the next job, ARGV[6] max envelope bytes,
# ARGV[7] max dead letters (0: no cap), ARGV[8] slot, ARGV[9] now (unix seconds)
# returns {code, next, skipped}: code 1 when requeued, 0 when the job was no
#         longer ours; next and skipped as for COMPLETE
REQUEUE_SCRIPT = (
    _TAKE_LUA
    + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return {0, false, 0}
end
if ARGV[3] == 'front' then
  redis.call('RPUSH', KEYS[2], ARGV[2])
else
  redis.call('LPUSH', KEYS[2], ARGV[2])
end
if ARGV[4] ~= '' then
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
end
if ARGV[5] == '1' then
  local v, skipped = take(KEYS[2], KEYS[1], KEYS[4], KEYS[3],
    tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]))
  return {1, v, skipped}
end
return {1, false, 0}
"""
)

# KEYS[1] config, KEYS[2..] ledger buckets
# ARGV[1] ttl seconds, then triples (bucket number b >= 1: KEYS[1 + b], state, seconds)
# returns the number of buckets written; each gets HINCRBYFLOAT per triple, then
#         ``slots`` set to the config's (when it says) and EXPIRE ttl. ``slots`` is
#         set by HINCRBYFLOAT of the difference, not HSET: the slot's ACL needs no
#         HSET, so a slot cannot rewrite the pool's config (docs/operations.md)
LEDGER_SCRIPT = """
for i = 2, #ARGV, 3 do
  redis.call('HINCRBYFLOAT', KEYS[1 + tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
end
local slots = tonumber(redis.call('HGET', KEYS[1], 'slots') or '')
for k = 2, #KEYS do
  if slots then
    local had = tonumber(redis.call('HGET', KEYS[k], 'slots') or '0') or 0
    if had ~= slots then
      redis.call('HINCRBYFLOAT', KEYS[k], 'slots', slots - had)
    end
  end
  redis.call('EXPIRE', KEYS[k], ARGV[1])
end
return #KEYS - 1
"""

# KEYS[1] inflight, KEYS[2] queue, KEYS[3] stats, KEYS[4] pause, KEYS[5] effective,
# KEYS[6] adapt, KEYS[7] config
# ARGV[1] envelope exactly as taken, ARGV[2] envelope to queue at the head,
# ARGV[3] pause ms (0: no pause), ARGV[4] the pause's end (unix seconds),
# ARGV[5] '1': adapt (lower effective by one, only without a pause: a Retry-After
# says when, not how many), ARGV[6] now (unix ms)
# returns {code, effective, pause ms left}: code 1 when requeued, 0 when the job
#         was no longer ours (nothing else done); effective is N when not lowered
#         and when adaptation is off
THROTTLE_SCRIPT = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return {0, 0, 0}
end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], 'throttled', 1)
local ms = tonumber(ARGV[3])
if ms > 0 and redis.call('PTTL', KEYS[4]) < ms then
  redis.call('SET', KEYS[4], ARGV[4], 'PX', ms)
end
local slots = tonumber(redis.call('HGET', KEYS[7], 'slots') or '') or 0
local eff = tonumber(redis.call('GET', KEYS[5]) or '') or slots
if eff > slots then
  eff = slots
end
if ARGV[5] == '1' and ms == 0 and slots > 0 then
  local refused = eff
  if eff > 1 then
    eff = eff - 1
  end
  redis.call('SET', KEYS[5], eff)
  redis.call('SET', KEYS[6], ARGV[6] .. ' 1 ' .. refused)
elseif ARGV[5] ~= '1' then
  eff = slots
end
return {1, eff, math.max(0, redis.call('PTTL', KEYS[4]))}
"""

# KEYS[1] pause, KEYS[2] effective, KEYS[3] adapt, KEYS[4] config
# ARGV[1] now (unix ms), ARGV[2] probe interval ms, ARGV[3] '1': adapt
# returns {effective, pause ms left, N}: effective is N when not lowered (or
#         when adaptation is off); N is 0 when the config does not say
SIGNALS_SCRIPT = """
local slots = tonumber(redis.call('HGET', KEYS[4], 'slots') or '') or 0
local eff = tonumber(redis.call('GET', KEYS[2]) or '')
if eff and ARGV[3] == '1' and slots > 0 then
  local now = tonumber(ARGV[1])
  local changed, step, ceiling = 0, 1, 0
  local adapt = redis.call('GET', KEYS[3])
  if adapt then
    local c, s, top = string.match(adapt, '^(%d+) (%d+) ?(%d*)$')
    changed, step, ceiling = tonumber(c) or 0, tonumber(s) or 1, tonumber(top) or 0
  end
  if eff >= slots then
    eff = nil
    redis.call('DEL', KEYS[2], KEYS[3])
  elseif now - changed >= tonumber(ARGV[2]) then
    local by, nextstep = step, step * 2
    if ceiling > 0 and eff >= ceiling then
      -- it held a probe interval at the level last refused: on one by one
      ceiling, by, nextstep = 0, 1, 2
    elseif ceiling > 0 and eff + step >= ceiling then
      -- up to the level last refused, no further, until it holds there
      by, nextstep = ceiling - eff, 1
    end
    eff = math.min(slots, eff + by)
    if eff >= slots then
      eff = nil
      redis.call('DEL', KEYS[2], KEYS[3])
    else
      redis.call('SET', KEYS[2], eff)
      redis.call('SET', KEYS[3], ARGV[1] .. ' ' .. nextstep .. ' ' .. ceiling)
    end
  end
end
if ARGV[3] ~= '1' then
  eff = nil
end
return {eff or slots, math.max(0, redis.call('PTTL', KEYS[1])), slots}
"""

SWEEP_INTERVAL_MS = 10_000
"""Pool-wide, SWEEP runs at most once in this many milliseconds (its guard's PX)."""
SWEEP_LIMIT = 10_000
"""The most expired ``unread`` members one SWEEP counts (the rest wait for the next)."""
CANCEL_SCAN = 1_000
"""The default bound of CANCEL's scan by id: envelopes read from the end slots take from."""

# KEYS[1] queue, KEYS[2] stats
# ARGV[1] job id, ARGV[2] the envelope exactly as submitted, or '' (not known),
# ARGV[3] the most envelopes to scan by id when the exact one is not in the queue
# returns 1 when the job was removed from the queue (counted ``cancelled``),
#         0 when it is not in the queue, -1 when it is not among the ARGV[3]
#         envelopes nearest the end slots take from (the queue is longer)
CANCEL_SCRIPT = """
if ARGV[2] ~= '' and redis.call('LREM', KEYS[1], 1, ARGV[2]) > 0 then
  redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
  return 1
end
local n = redis.call('LLEN', KEYS[1])
local stop = math.max(0, n - tonumber(ARGV[3]))
local hi = n - 1
while hi >= stop do
  local lo = math.max(stop, hi - 99)
  local chunk = redis.call('LRANGE', KEYS[1], lo, hi)
  for i = #chunk, 1, -1 do
    local v = chunk[i]
    if string.find(v, ARGV[1], 1, true) then
      local ok, doc = pcall(cjson.decode, v)
      if ok and type(doc) == 'table' and doc['id'] == ARGV[1] then
        redis.call('LREM', KEYS[1], -1, v)
        redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
        return 1
      end
    end
  end
  hi = lo - 1
end
if stop > 0 then
  return -1
end
return 0
"""

# KEYS[1] unread, KEYS[2] stats, KEYS[3] sweep guard
# ARGV[1] now (unix ms), ARGV[2] guard ms, ARGV[3] the most members to count
# returns the number of expired unread results counted (and removed from
#         KEYS[1]), or -1 when another sweep ran less than ARGV[2] ms ago
SWEEP_SCRIPT = """
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return -1
end
local n = math.min(redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[1]), tonumber(ARGV[3]))
if n > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - 1)
  redis.call('HINCRBY', KEYS[2], 'expired_unread', n)
end
return n
"""
