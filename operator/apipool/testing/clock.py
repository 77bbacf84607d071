"""A clock for tests: time that moves only when told to."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock (a callable returning seconds) that moves only on
    :meth:`advance`; pass it where a component takes ``clock=time.monotonic``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
