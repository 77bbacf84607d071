"""The kubelet's crash-loop back-off for one container (``CrashLoopBackOff``).

The classic curve: the first restart is immediate; each further restart waits
``initial`` seconds, doubling up to ``cap``; a container that ran ``reset_after``
seconds before it exited starts the curve again. (Kubernetes 1.32+ lets a node
tune the curve; these are the defaults.)
"""

from __future__ import annotations

import dataclasses

__all__ = ["Backoff", "BackoffPolicy"]


@dataclasses.dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 10.0
    cap: float = 300.0
    reset_after: float = 600.0


@dataclasses.dataclass
class Backoff:
    """The back-off state of one container of one pod."""

    policy: BackoffPolicy = dataclasses.field(default_factory=BackoffPolicy)
    crashes: int = 0
    """Exits counted since the curve last started again."""

    def next_delay(self, ran_for: float) -> float:
        """Seconds to wait before restarting a container that exited after
        running ``ran_for`` seconds; counts this exit."""
        if ran_for >= self.policy.reset_after:
            self.crashes = 0
        delay = 0.0 if self.crashes == 0 else self.policy.initial * 2 ** (self.crashes - 1)
        self.crashes += 1
        return min(delay, self.policy.cap)
