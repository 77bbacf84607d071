"""`python -m compare --quick`: the three systems run end to end on one harness.

Needs the `compare` extra (dramatiq[redis], matplotlib). Skipped when it is
missing here, but failed when `CI=true`: CI installs it and must run this test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, SUBPROCESS_ENV

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

SYSTEMS = ("apipool", "dramatiq", "zset")
FIGURES = (
    "max_concurrency",
    "over_limit_seconds",
    "utilization",
    "goodput",
    "lost",
    "recovery",
    "faults",
    "samples",
    "limit",
)


def _need_extra() -> None:
    missing = [m for m in ("dramatiq", "matplotlib") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    why = (
        f"the compare extra is not installed (missing: {', '.join(missing)}); "
        "pip install -e '.[compare]'"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {why}")
    pytest.skip(why)


def test_compare_quick(tmp_path: Path) -> None:
    _need_extra()
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "compare", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert not doc["failed"]
    assert set(doc["systems"]) == set(SYSTEMS)
    for name in SYSTEMS:
        res = doc["systems"][name]
        for key in FIGURES:
            assert key in res, f"{name}: no {key}"
        assert 0.0 <= res["goodput"] <= 1.0 + 1e-6, name
        assert res["samples"], f"{name}: empty timeline"
    png = out / "concurrency.png"
    assert png.is_file()
    assert png.stat().st_size > 0
    # The one invariant that must hold in any run: apipool never goes over N.
    pool = doc["systems"]["apipool"]
    assert pool["max_concurrency"] <= pool["limit"], pool["over_limit_events"]
    assert pool["over_limit_seconds"] == 0.0
    # Then apipool's own failover table: plain slots and keepers, both within the cap.
    failover = doc["failover"]
    assert "SIGSTOP 8 s every 3 s" in proc.stdout
    for run in ("kill_plain", "kill_standby", "hang_plain", "hang_standby"):
        assert failover[f"over_limit_s_{run}"] == 0, run
        assert failover[f"max_concurrency_{run}"] <= failover["slots"], run
        assert failover[f"faults_{run}"] >= 1, run
