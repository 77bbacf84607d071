"""How long a slot's worker has been silent, counting only time it could have spoken.

A keeper (keeper.py) calls a worker hung when its event loop has written no
beat for ``hang_window`` seconds. Wall time alone would cry wolf on a busy
node, so two stretches are not counted:

- time the keeper itself did not run: each look credits at most ``max_step``
  seconds, however long ago the last look was (a paused VM, a frozen or
  CPU-throttled pod stops the keeper and the worker alike; neither could have
  spoken, and the keeper cannot tell what happened meanwhile);
- time the worker waited for a CPU: while its main thread is runnable (state
  ``R``), only the CPU time it actually got counts (other processes, a CFS
  quota's throttling hold a runnable process back; the kernel's run-delay
  figure would say so only once it runs again, too late to help).

A worker that is stopped (``T``), blocked on something that never comes
(``S``, ``D``: a deadlock, a call without a timeout) or spinning on the CPU with
its event loop held (``R``, its CPU time growing) has its silence counted in
full: that is a hang. All pure but :func:`sample`, which reads the kernel's view
of the worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

NANOSECONDS = 1e9


@dataclass(frozen=True)
class Sample:
    """The kernel's view of a worker's main thread at one look."""

    runnable: bool
    """State ``R``: running, or waiting for a CPU."""
    cpu: float
    """Seconds of CPU the thread has had."""


def sample(pid: int) -> Sample | None:
    """How process ``pid``'s main thread stands now; None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        runnable = fields[0] == b"R"
        try:
            with open(f"/proc/{pid}/schedstat", "rb") as f:
                cpu = int(f.read().split()[0]) / NANOSECONDS
        except (OSError, IndexError, ValueError):  # no schedstat: clock ticks
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
    return Sample(runnable, cpu)


@dataclass
class SilenceClock:
    """The silence of one worker, looked at by its keeper every few tens of ms."""

    window: float
    """Counted silence past which the worker is hung."""
    max_step: float = 0.1
    """The most one look credits, however long since the last one."""
    silent: float = 0.0
    """Silence counted since the last beat."""
    waited: float = 0.0
    """Of the time since the last beat: what was not counted (the worker waited
    for a CPU, or the keeper itself was late)."""
    _last: Sample | None = None

    def heard(self, now: Sample | None) -> None:
        """A beat came: silence starts again from here."""
        self.silent = self.waited = 0.0
        self._last = now

    def look(self, elapsed: float, now: Sample | None) -> float:
        """Account ``elapsed`` seconds since the last look, the worker standing as
        ``now``; returns the silence counted so far."""
        elapsed = max(0.0, elapsed)
        counted = min(elapsed, self.max_step)
        if now is not None and now.runnable and self._last is not None:
            counted = min(counted, max(0.0, now.cpu - self._last.cpu))
        if now is not None:
            self._last = now
        self.silent += counted
        self.waited += elapsed - counted
        return self.silent

    @property
    def hung(self) -> bool:
        return self.silent > self.window
