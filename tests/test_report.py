"""``apipool report`` and the slot-seconds line of ``apipool stats``."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis
from rich.console import Console

from apipool.ledger import SlotSeconds
from apipool.protocol import PoolProtocol
from apipool.report import render
from apipool.stats import write_pool_config

from .conftest import ROOT, SUBPROCESS_ENV

STATES = {
    "starting": 2.0,
    "recovering": 0.0,
    "waiting_for_work": 30.0,
    "calling": 150.0,
    "handoff": 3.0,
    "held_back": 12.0,
    "fenced": 1.0,
}


def screen(seconds: SlotSeconds) -> str:
    console = Console(record=True, width=100, color_system=None)
    console.print(render(seconds))
    return console.export_text()


@pytest.mark.unit
def test_the_report_shows_the_share_used_and_each_loss_largest_first() -> None:
    seconds = SlotSeconds("billing", 1_700_000_000.0, 1_700_000_060.0, 4, 240.0, dict(STATES))
    text = screen(seconds)
    assert "pool billing" in text
    assert "capacity used for calling: 62.5%" in text  # 150 / (4 x 60)
    rows = [[c.strip() for c in line.split("│") if c.strip()] for line in text.splitlines()]
    causes = [row[0] for row in rows if len(row) >= 3 and row[2].endswith("%")]
    assert causes[:3] == ["down", "waiting for work", "held back"]  # 42 s, 30 s, 12 s
    assert "42.0" in text  # down: 240 - 198
    assert "17.5%" in text  # down's share
    assert "largest loss: down (17.5% of capacity)" in text


@pytest.mark.unit
def test_a_range_with_nothing_recorded_says_so() -> None:
    text = screen(SlotSeconds("billing", 0.0, 60.0, 0, 0.0, {}))
    assert "no slot-seconds recorded" in text


def run_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(SUBPROCESS_ENV, APIPOOL_REDIS_URL=redis_url, COLUMNS="100")
    return subprocess.run(
        [sys.executable, "-m", "apipool", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_report_and_stats_read_the_pools_ledger(r: redis.Redis, redis_url: str, pool: str) -> None:
    write_pool_config(r, pool, slots=2)
    minute = int(time.time() // 60)
    PoolProtocol(pool).ledger({minute - 1: {"calling": 100.0, "held_back": 20.0}}).run(r)
    out = run_cli(redis_url, "report", "--pool", pool, "--since", "5m", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["slots"] == 2
    assert doc["since"] == (minute - 1) * 60
    assert doc["states"]["calling"] == 100
    assert doc["capacity_seconds"] == pytest.approx(2 * (doc["until"] - doc["since"]))
    assert doc["utilization"] == pytest.approx(100 / doc["capacity_seconds"])

    out = run_cli(redis_url, "report", "--pool", pool, "--since", "1h")
    assert out.returncode == 0, out.stderr
    assert f"pool {pool}" in out.stdout
    assert "capacity used for calling: " in out.stdout
    assert "held back" in out.stdout
    assert "largest loss: " in out.stdout

    out = run_cli(redis_url, "stats", "--pool", pool)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "slot-seconds" in x)
    assert "calling=" in line
    assert "held_back=" in line
    out = run_cli(redis_url, "stats", "--pool", pool, "--json")
    assert json.loads(out.stdout)["slot_seconds"]["states"]["held_back"] == 20


@pytest.mark.unit
def test_report_refuses_a_duration_it_cannot_read() -> None:
    out = run_cli("redis://127.0.0.1:1/0", "report", "--pool", "p", "--since", "soon")
    assert out.returncode == 2
    assert "a duration like 90s, 15m, 1h" in out.stderr
