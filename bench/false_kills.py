"""Hang detection that does not cry wolf: keepers under a busy machine, no faults.

A full pool of slots under keepers (``--standby``, the default hang window)
serves 100 ms calls for ``DURATION_S`` (10 minutes; ``--quick``: 20 s) while one
busy-looping process per CPU core competes for the machine. No fault is
injected, so every worker the keepers kill is a false kill: the keepers' own
logs are read for them (``silent for``) and for promotions. The same run
reports the cap and the goodput under that load.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from apipool import defaults
from apipool.testing.harness import Scenario, run_scenario

from .common import Figures, Target

SLOTS = 8
CALL_MS = 100.0
DURATION_S = 600.0
QUICK_DURATION_S = 20.0
HOG = "while True: pass"

TARGETS = {
    "false_kills": Target("<=", 0),
    "over_limit_s": Target("<=", 0.0),
    "lost": Target("<=", 0),
}


def _count(log_dir: Path, text: str) -> int:
    return sum(p.read_text(errors="replace").count(text) for p in log_dir.glob("*.log"))


def run(*, quick: bool = False, seed: int = 1) -> Figures:
    duration = QUICK_DURATION_S if quick else DURATION_S
    cores = os.cpu_count() or 1
    hogs = [
        subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.DEVNULL)
        for _ in range(cores)
    ]
    try:
        with tempfile.TemporaryDirectory(prefix="apipool-false-kills-") as tmp:
            scenario = replace(
                Scenario(slots=SLOTS, call_ms=CALL_MS, seed=seed),
                duration=duration,
                standby=True,
                log_dir=tmp,
            )
            result = asyncio.run(run_scenario(scenario))
            logs = Path(tmp)
            kills = _count(logs, "silent for")
            promotions = _count(logs, "promoted")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    return {
        "slots": SLOTS,
        "call_ms": CALL_MS,
        "duration_s": duration,
        "cpu_hogs": cores,
        "cores": cores,
        "hang_window_s": defaults.HANG_WINDOW,
        "false_kills": kills,
        "promotions": promotions,
        "goodput": round(result.goodput, 4),
        "over_limit_s": round(result.over_limit_seconds, 3),
        "max_concurrency": result.max_concurrency,
        "lost": result.lost,
        "restarts": result.restarts,
    }
