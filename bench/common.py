"""What the benchmarks share: targets, percentiles, and a slot worker subprocess."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Self

from apipool import defaults
from apipool.settings import ENV_OWNER, ENV_REDIS_URL, HttpPolicy, Limits, SlotSettings, Timings

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root: holds ``bench/`` and ``operator/apipool/``."""

Value = float | int | str
"""A figure: a number, or a short text (the parameters of a run)."""
Figures = dict[str, Value]

MIB = 1 << 20
"""Bytes in a MiB: sizes and memory figures are given in MiB (names end in ``_mib``)."""


@dataclass(frozen=True)
class Target:
    """A bound a figure should meet: ``figure <op> value``."""

    op: Literal[">=", "<="]
    value: float

    def met(self, figure: Value) -> bool | None:
        """Whether ``figure`` meets the target (None: not a number)."""
        if isinstance(figure, str) or (isinstance(figure, float) and math.isnan(figure)):
            return None
        return figure >= self.value if self.op == ">=" else figure <= self.value

    def __str__(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {self.value:g}"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def maximum(values: Sequence[float]) -> float:
    return max(values) if values else math.nan


def peak_rss_mib(pid: int) -> float:
    """The peak resident set size of process ``pid`` so far (``VmHWM`` of
    ``/proc/<pid>/status``), in MiB; Linux only."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / MIB, 1)
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def pss_mib(pids: Sequence[int]) -> float:
    """The proportional set size of processes ``pids`` together, in MiB: pages
    shared between them (a fork's copy-on-write pages) counted once
    (``Pss`` of ``/proc/<pid>/smaps_rollup``); Linux only."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return round(total / MIB, 1)


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (``/proc/<pid>/task/<pid>/children``)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child that must import both ``apipool`` and ``bench``."""
    paths = [str(REPO_ROOT), str(REPO_ROOT / "operator")]
    inherited = os.environ.get("PYTHONPATH")
    if inherited:
        paths.append(inherited)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), **extra)


class ChildProcess:
    """A child process of the benchmark: started with its output in a temporary
    file (shown when something goes wrong), stopped with SIGTERM, then SIGKILL
    after ``stop_timeout`` seconds."""

    what = "child process"

    def __init__(self, cmd: list[str], env: dict[str, str], stop_timeout: float) -> None:
        self.cmd = cmd
        self.env = env
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Self:
        self._log = tempfile.TemporaryFile(prefix="apipool-bench-")  # noqa: SIM115 - stop()
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"the {self.what} has not been started")
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise RuntimeError with the process's log when it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.what} exited with {self.proc.returncode}:\n{self.log()}")

    def log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class SlotSubprocess(ChildProcess):
    """``python -m apipool slot`` as a child process, stopped with SIGTERM on exit.

    Its command line is :meth:`SlotSettings.to_argv`; the Redis URL and the owner
    reach it through ``APIPOOL_REDIS_URL`` and ``APIPOOL_OWNER``. It gets
    ``--parent-pid`` so it also stops by itself if this process dies, and
    logs (WARNING and up) to a temporary file shown when something goes wrong.
    """

    what = "slot process"

    def __init__(
        self,
        redis_url: str,
        pool: str,
        handlers: Sequence[str],
        *,
        slot: int = 0,
        call_timeout: float = 2.0,
        heartbeat_interval: float = 0.5,
        take_block: float = defaults.TAKE_BLOCK,
        max_attempts: int = defaults.MAX_ATTEMPTS,
        limits: Limits | None = None,
        http: HttpPolicy | None = None,
        standby: bool = False,
    ) -> None:
        self.settings = SlotSettings(
            pool=pool,
            slot=slot,
            redis_url=redis_url,
            handlers=tuple(handlers),
            timings=Timings(
                call_timeout=call_timeout,
                heartbeat_interval=heartbeat_interval,
                take_block=take_block,
            ),
            max_attempts=max_attempts,
            limits=limits or Limits(),
            http=http or HttpPolicy(),
            owner=f"bench-{os.getpid()}",
            health_port=0,
            parent_pid=os.getpid(),
            standby=standby,  # off: the worker itself is what most benchmarks measure
        )
        cmd = [sys.executable, "-m", "apipool", "--log-level", "WARNING"]
        # The Redis URL and the owner travel in the environment, not on the command line.
        env = subprocess_env(**{ENV_REDIS_URL: redis_url, ENV_OWNER: self.settings.owner})
        super().__init__(cmd + self.settings.to_argv(), env, call_timeout + 10.0)


def machine() -> dict[str, str | int | None]:
    """Where the figures were measured."""
    try:
        redis_version = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        redis_version = "unknown"
    try:
        import redis

        redis_py = str(redis.__version__)
    except ImportError:  # pragma: no cover - redis is a dependency
        redis_py = "unknown"
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "redis_server": redis_version,
        "redis_py": redis_py,
    }
