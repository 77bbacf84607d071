"""Hang detection that does not cry wolf: keepers under a busy machine, no faults.

A full pool of slots under keepers (``--standby``, the default hang window)
serves 100 ms calls while no fault is injected, so every worker a keeper kills
is a false kill: the keepers' own logs are read for them (``silent for``) and
for promotions. Two runs, the same figures for each:

- ``loaded``: one busy-looping process per CPU core competes for the machine,
  for ``DURATION_S`` (10 minutes; ``--quick``: 20 s);
- ``throttled``: the slots' processes (keepers, workers, standbys) and one busy
  loop share a CPU quota (a cgroup of the v1 ``cpu`` controller:
  ``THROTTLE_QUOTA_US`` of every ``THROTTLE_PERIOD_US``), so that the busy loop
  spends the quota early in each period and every slot process then stands
  still for most of the rest, well past the hang window (as a pod whose CPU
  limit is used up). ``THROTTLED_S`` (5 minutes; quick: 20 s). Skipped (figures
  ``n/a``) where that controller is not mounted or writable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from apipool import defaults
from apipool.testing.harness import Scenario, run_scenario

from .common import Figures, Target

SLOTS = 8
CALL_MS = 100.0
DURATION_S = 600.0
THROTTLED_S = 300.0
QUICK_DURATION_S = 20.0
HOG = "while True: pass"
CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")
THROTTLE_PERIOD_US = 1_000_000
THROTTLE_QUOTA_US = 300_000
"""At most 0.3 s of CPU per second for the slots and the busy loop together."""

TARGETS = {
    **{f"false_kills_{run}": Target("<=", 0) for run in ("loaded", "throttled")},
    **{f"over_limit_s_{run}": Target("<=", 0.0) for run in ("loaded", "throttled")},
    **{f"lost_{run}": Target("<=", 0) for run in ("loaded", "throttled")},
}


def _count(log_dir: Path, text: str) -> int:
    return sum(p.read_text(errors="replace").count(text) for p in log_dir.glob("*.log"))


def _hog() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.DEVNULL)


def _slot_processes(parent: int) -> Iterator[int]:
    """Pids of ``apipool slot`` processes below ``parent`` (keepers and their forks)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"apipool" not in argv or b"slot" not in argv:
                continue
            pid = int(entry.name)
            while pid > 1:
                stat = Path(f"/proc/{pid}/stat").read_text()
                pid = int(stat.rsplit(")", 1)[1].split()[1])
                if pid == parent:
                    yield int(entry.name)
                    break


class Throttle:
    """A cgroup with a CFS quota that this run's slot processes are moved into as
    they appear (forks of a moved keeper are born inside), plus one busy loop."""

    def __init__(self) -> None:
        self.path = CPU_CGROUPS / f"apipool-bench-{uuid.uuid4().hex[:8]}"
        self.stop = threading.Event()
        self.moved: set[int] = set()
        self.thread = threading.Thread(target=self._move, daemon=True)
        self.hog: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return os.access(CPU_CGROUPS, os.W_OK) and (CPU_CGROUPS / "cpu.cfs_quota_us").exists()

    def __enter__(self) -> Throttle:
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(str(THROTTLE_PERIOD_US))
        (self.path / "cpu.cfs_quota_us").write_text(str(THROTTLE_QUOTA_US))
        self.hog = _hog()
        self._add(self.hog.pid)
        self.thread.start()
        return self

    def _add(self, pid: int) -> None:
        with contextlib.suppress(OSError):  # gone meanwhile
            (self.path / "cgroup.procs").write_text(str(pid))
            self.moved.add(pid)

    def _move(self) -> None:
        while not self.stop.wait(0.2):
            for pid in _slot_processes(os.getpid()):
                if pid not in self.moved:
                    self._add(pid)

    def throttled_periods(self) -> int:
        for line in (self.path / "cpu.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "nr_throttled":
                return int(value)
        return 0

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5.0)
        if self.hog is not None:
            self.hog.kill()
            self.hog.wait()
        parent = self.path.parent / "cgroup.procs"
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                parent.write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _pool_run(duration: float, seed: int, name: str) -> Figures:
    with tempfile.TemporaryDirectory(prefix="apipool-false-kills-") as tmp:
        scenario = replace(
            Scenario(slots=SLOTS, call_ms=CALL_MS, seed=seed),
            duration=duration,
            standby=True,
            log_dir=tmp,
        )
        result = asyncio.run(run_scenario(scenario))
        logs = Path(tmp)
        return {
            f"duration_s_{name}": duration,
            f"false_kills_{name}": _count(logs, "silent for"),
            f"promotions_{name}": _count(logs, "promoted"),
            f"goodput_{name}": round(result.goodput, 4),
            f"over_limit_s_{name}": round(result.over_limit_seconds, 3),
            f"max_concurrency_{name}": result.max_concurrency,
            f"lost_{name}": result.lost,
            f"restarts_{name}": result.restarts,
        }


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    cores = os.cpu_count() or 1
    figures: Figures = {
        "slots": SLOTS,
        "call_ms": CALL_MS,
        "cores": cores,
        "cpu_hogs_loaded": cores,
        "hang_window_s": defaults.HANG_WINDOW,
    }
    hogs = [_hog() for _ in range(cores)]
    try:
        figures.update(_pool_run(QUICK_DURATION_S if quick else DURATION_S, seed, "loaded"))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    if not Throttle.available():
        figures["throttled"] = "n/a: no writable cgroup v1 cpu controller"
        return figures
    figures["cpu_quota_throttled"] = (
        f"{THROTTLE_QUOTA_US // 1000} ms per {THROTTLE_PERIOD_US // 1000} ms"
    )
    with Throttle() as throttle:
        figures.update(_pool_run(QUICK_DURATION_S if quick else THROTTLED_S, seed, "throttled"))
        figures["throttled_periods"] = throttle.throttled_periods()
        figures["processes_throttled"] = len(throttle.moved)
    return figures
