"""Where the demo pool's slot-seconds went, for the live view (from the pool's ledger).

The harness names its pool itself; :class:`LedgerWatch` is made before the run
starts, notes the pools the Redis already holds, and takes the one that
appears. Shares are of N x the seconds since the watch began (``down``: what no
slot process accounted for: restarts, a killed slot, the seconds a slot has not
written yet, about one heartbeat).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from redis.exceptions import RedisError
from rich.text import Text

from ..layout import PoolKeys
from ..ledger import read_ledger
from .figures import BAD, BAR_WIDTH, DIM, GOOD, WARN

READ_EVERY = 1.0
"""Seconds between two reads of the ledger."""
STYLES = {
    "calling": GOOD,
    "waiting_for_work": "cyan",
    "held_back": WARN,
    "fenced": BAD,
    "down": "red",
}
"""Colours of the main states; the others are drawn dim."""

Shares = dict[str, float]


def _config_keys(r: redis.Redis) -> set[bytes]:
    return set(r.scan_iter(match=PoolKeys("*").config, count=1000))  # every pool's config


def _pool_of(key: bytes) -> str:
    text = key.decode(errors="replace")
    return text[text.index("{") + 1 : text.rindex("}")]


class LedgerWatch:
    """Reads the shares of the new pool's states, at most every :data:`READ_EVERY` s."""

    def __init__(self, redis_url: str, slots: int, clock: Callable[[], float] = time.time):
        self.r = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.slots = slots
        self._clock = clock
        self.started = clock()
        self.before = self._safe(lambda: _config_keys(self.r)) or set()
        self.pool: str | None = None
        self.shares: Shares | None = None
        self._read_at = 0.0

    def _safe(self, read: Callable[[], set[bytes]]) -> set[bytes] | None:
        try:
            return read()
        except RedisError:
            return None

    def refresh(self) -> Shares | None:
        """The latest shares (read again when due); None before the pool wrote any."""
        now = self._clock()
        if now - self._read_at < READ_EVERY:
            return self.shares
        self._read_at = now
        try:
            if self.pool is None:
                new = sorted(_config_keys(self.r) - self.before)
                self.pool = _pool_of(new[0]) if new else None
            if self.pool is not None:
                seconds = read_ledger(self.r, self.pool, seconds=now - self.started + 1, now=now)
                self.shares = shares_of(seconds.states, self.slots * (now - self.started))
        except RedisError:
            pass  # the run's own figures say what is wrong with Redis
        return self.shares

    def close(self) -> None:
        self.r.close()


def shares_of(states: dict[str, float], capacity: float) -> Shares:
    """Each state's share of ``capacity`` seconds, and ``down`` for the rest."""
    if capacity <= 0:
        return {}
    shares = {state: seconds / capacity for state, seconds in states.items() if seconds > 0}
    shares["down"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def states_bar(shares: Shares, width: int = BAR_WIDTH) -> tuple[Text, Text]:
    """A bar split by share, largest first, and its legend (the states over 1 %)."""
    bar = Text()
    drawn = 0
    ordered = sorted(shares.items(), key=lambda item: -item[1])
    for state, share in ordered:
        cells = min(width - drawn, round(share * width))
        bar.append("█" * cells, style=STYLES.get(state, DIM))
        drawn += cells
    bar.append("·" * (width - drawn), style=DIM)
    legend = Text(" ").join(
        Text(f"{state.replace('_', ' ')} {100 * share:.0f}%", style=STYLES.get(state, DIM))
        for state, share in ordered
        if share >= 0.01
    )
    return bar, legend
