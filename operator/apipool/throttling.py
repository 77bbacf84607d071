"""When the API says "slow down": Retry-After, back-off, the pool's pause and
its effective concurrency (pure; the Redis side is THROTTLE and SIGNALS in
layout.py).

- A ``Retry-After`` (delta-seconds or an HTTP date, RFC 9110 10.2.3) pauses the
  whole pool that long, at most ``max_pause`` (an API, or a proxy in front of
  it, that asks for a day must not stop the pool for a day: the clamp is
  logged). The job that heard it waits as long (``not_before``).
- Without one, the job waits a back-off: exponential in how often it was
  throttled, with jitter (half to all of ``BACKOFF_BASE`` x 2^k, at most
  ``MAX_BACKOFF``), and the pool uses one slot fewer for a while (adaptive).
- A job's attempt count is kept: the API refused the call, it did not fail it.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from .protocol import Signals

BACKOFF_BASE = 0.1
"""Seconds of the first back-off of a job throttled without Retry-After (half to all of it)."""
MAX_BACKOFF = 30.0
"""The longest back-off of one job without Retry-After."""
SIGNALS_EVERY = 0.2
"""Seconds between two reads of the pool's pause and effective concurrency by a slot."""
MAX_RETRY_AFTER_CHARS = 64
"""A longer Retry-After value is not read (it is no number of seconds or date)."""
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds the API asks to wait, from a ``Retry-After`` header value: a
    number of seconds, or an HTTP date (seconds from ``now``, at least 0). None:
    absent, empty or unreadable (the caller backs off instead)."""
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > MAX_RETRY_AFTER_CHARS:
        return None
    if not text.isascii():  # a header value is ASCII: "²" or "٣" is no number of seconds
        return None
    if _SECONDS.fullmatch(text):  # digits, or (not the standard, seen in the wild) "1.5"
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        return None
    return max(0.0, when.timestamp() - now)


def backoff(throttled: int, rng: random.Random | None = None) -> float:
    """Seconds a job throttled ``throttled`` times before (0 the first time) waits
    when the API gave no Retry-After: half to all of base x 2^k, capped."""
    ceiling = min(MAX_BACKOFF, BACKOFF_BASE * 2.0 ** min(throttled, 30))
    return ceiling * (0.5 + 0.5 * (rng or random).random())


@dataclass
class PoolSignals:
    """What a slot last heard of its pool's pause and effective concurrency."""

    slot: int
    effective: int = 0
    """Slots at or above this index are parked; 0 until heard (nothing parked)."""
    pause_until: float = 0.0
    """Unix time the pool's pause ends (0: none heard)."""
    read_at: float = -math.inf
    """time.monotonic() of the last read."""

    def heard(self, signals: Signals, *, now: float | None = None) -> None:
        """Take in a THROTTLE or SIGNALS reply."""
        now = time.time() if now is None else now
        self.effective = signals.effective
        if signals.pause_ms > 0:
            self.pause_until = max(self.pause_until, now + signals.pause_ms / 1000.0)

    def due(self, monotonic: float) -> bool:
        """Whether it is time to read the signals again."""
        return monotonic - self.read_at >= SIGNALS_EVERY

    @property
    def parked(self) -> bool:
        """Whether this slot is above the pool's effective concurrency."""
        return 0 < self.effective <= self.slot

    def pause_left(self, now: float | None = None) -> float:
        """Seconds of the pool's pause still to wait (0: not paused)."""
        now = time.time() if now is None else now
        return max(0.0, self.pause_until - now)
