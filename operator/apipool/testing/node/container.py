"""One run of a container: a local process in its pod's network namespace.

The process is the container's PID 1: it is started in a session (process
group) of its own; signals go to it alone, as the kubelet's go to PID 1; when it
has exited, what is left of its group is SIGKILLed, as the end of a PID
namespace kills every process in it. Its output goes to a log file, as the
container runtime's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ContainerProcess", "exit_code", "rfc3339"]


def rfc3339(when: float) -> str:
    """A wall-clock time as the API writes it (seconds, UTC)."""
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_code(returncode: int) -> int:
    """The container's exit code: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class ContainerProcess:
    """A started container process (one run; a restart is a new instance)."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        prefix: Sequence[str] = (),
        cwd: str | None = None,
    ) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.argv = list(argv)
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.finished_at: float | None = None
        self._finished_mono: float | None = None
        with log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [*prefix, *argv],
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._proc.pid

    def poll(self) -> int | None:
        """The return code once the process has exited (reaped), else None."""
        code = self._proc.poll()
        if code is not None:
            if self.finished_at is None:
                self.finished_at = time.time()
                self._finished_mono = time.monotonic()
            self.signal_group(signal.SIGKILL)
        return code

    @property
    def ran_for(self) -> float:
        """Seconds it ran (so far, or until it exited)."""
        end = self._finished_mono if self._finished_mono is not None else time.monotonic()
        return end - self.started_mono

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to PID 1; False if it has already exited."""
        if self.poll() is not None:
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to every process of the container (its process group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def stop(self, grace: float) -> int:
        """The kubelet's kill: SIGTERM, up to ``grace`` seconds, then SIGKILL.
        Returns the return code."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (code := self.poll()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            while (code := self.poll()) is None:
                await asyncio.sleep(0.02)
        return code

    def kill_now(self) -> None:
        """SIGKILL the process and its group, and reap it (the node shutting down)."""
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        self.poll()
