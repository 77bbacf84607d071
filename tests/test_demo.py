"""``apipool demo``: the pure formatting helpers, and the real CLI end to end."""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console, RenderableType

from apipool.demo import (
    BAR_WIDTH,
    LiveView,
    RateMeter,
    build_scenario,
    chaos_interval,
    concurrency_bar,
    faults_by_kind,
    over_limit_text,
    progress_line,
    recovery_text,
    render_panel,
    render_summary,
    result_doc,
    run_demo,
    summary_sections,
    verdict,
    verdict_text,
)
from apipool.testing.harness import FAULT_KINDS, Fault, Scenario, ScenarioResult, Snapshot

ROOT = Path(__file__).resolve().parent.parent


# -- helpers -------------------------------------------------------------------------


def snap(**changes: Any) -> Snapshot:
    base = Snapshot(
        elapsed=12.3,
        duration=30.0,
        limit=4,
        active=4,
        in_flight=4,
        max_concurrency=4,
        over_limit_seconds=0.0,
        utilization=0.975,
        queued=12,
        busy_slots=4,
        ok_calls=1204,
        throughput=38.2,
        restarts=2,
        faults=3,
        submitted=1220,
    )
    return replace(base, **changes)


def result(**changes: Any) -> ScenarioResult:
    base = ScenarioResult(
        slots=4,
        limit=4,
        duration=30.0,
        call_ms=100.0,
        chaos=True,
        max_concurrency=4,
        max_in_flight=4,
        over_limit_seconds=0.0,
        over_limit_events=[],
        rejected=0,
        utilization=0.93,
        goodput=0.81,
        api_calls_ok=1100,
        submitted=1120,
        completed=1120,
        expired=0,
        dead=0,
        lost=0,
        duplicated=0,
        unfinished=0,
        restarts=3,
        faults=[
            Fault(1.0, "kill", 0, 100),
            Fault(4.0, "kill", 2, 101),
            Fault(7.5, "stop_long", 1, 102),
        ],
        kill_recovery=[0.12, 0.3],
        hang_detection=[2.4],
        hang_recovery=[2.7],
    )
    return replace(base, **changes)


def plain(renderable: RenderableType, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


def styles_of(renderable: RenderableType, needle: str, width: int = 100) -> list[str]:
    """The styles of the rendered segments whose text contains ``needle``."""
    console = Console(file=io.StringIO(), width=width, color_system="truecolor")
    return [
        str(seg.style)
        for seg in console.render(renderable)
        if needle in seg.text and seg.style is not None
    ]


def is_red(style: str) -> bool:
    return "red" in style.split()


def is_green(style: str) -> bool:
    return "green" in style.split()


def demo_args(**changes: Any) -> argparse.Namespace:
    base: dict[str, Any] = {
        "duration": 30.0,
        "slots": 4,
        "chaos": False,
        "json": False,
        "redis_url": None,
        "call_ms": 100.0,
        "seed": None,
    }
    base.update(changes)
    return argparse.Namespace(**base)


# -- the live panel ------------------------------------------------------------------


@pytest.mark.unit
def test_bar_at_the_limit_is_full_and_green() -> None:
    bar = concurrency_bar(4, 4)
    assert bar.plain.endswith(" 4/4")
    assert "█" in bar.plain
    assert "░" not in bar.plain
    assert all(is_green(str(span.style)) for span in bar.spans if span.style)


@pytest.mark.unit
def test_bar_below_the_limit_shows_free_slots() -> None:
    bar = concurrency_bar(2, 4)
    assert bar.plain.endswith(" 2/4")
    segments = bar.plain.rsplit(" ", 1)[0].split(" ")
    assert [set(s) for s in segments] == [{"█"}, {"█"}, {"░"}, {"░"}]


@pytest.mark.unit
def test_bar_over_the_limit_is_red_past_a_mark() -> None:
    bar = concurrency_bar(5, 4)
    assert bar.plain.endswith(" 5/4")
    assert "┃" in bar.plain
    assert any(is_red(str(span.style)) for span in bar.spans)


@pytest.mark.unit
@pytest.mark.parametrize(("active", "limit"), [(0, 64), (1, 64), (64, 64), (80, 64), (3, 200)])
def test_bar_for_a_large_limit_keeps_its_width(active: int, limit: int) -> None:
    bar = concurrency_bar(active, limit)
    assert bar.plain.endswith(f" {active}/{limit}")
    assert len(bar.plain) <= BAR_WIDTH + BAR_WIDTH // 4 + 1 + len(f" {active}/{limit}")
    if active:
        assert "█" in bar.plain  # one connection open is never drawn as none


@pytest.mark.unit
def test_over_limit_seconds_green_at_zero_red_otherwise() -> None:
    assert over_limit_text(0.0).plain == "0.00 s"
    assert is_green(str(over_limit_text(0.0).style))
    assert over_limit_text(0.31).plain == "0.31 s"
    assert is_red(str(over_limit_text(0.31).style))


@pytest.mark.unit
def test_panel_shows_every_figure() -> None:
    text = plain(render_panel(snap(), limit=4, duration=30.0, throughput=37.9, chaos=True))
    for expected in (
        "4/4",  # bar, peak and busy slots
        "0.00 s",
        "97.5 %",
        "12",  # queued
        "37.9/s",
        "1,204",
        "12.3 / 30 s",
        "chaos on",
        "limit 4",
    ):
        assert expected in text, expected
    assert text.count("4/4") >= 3


@pytest.mark.unit
def test_panel_is_green_at_the_limit() -> None:
    panel = render_panel(snap(), limit=4, duration=30.0)
    assert any(is_green(s) for s in styles_of(panel, "0.00 s"))
    assert not any(is_red(s) for s in styles_of(panel, "0.00 s"))


@pytest.mark.unit
def test_panel_is_red_over_the_limit() -> None:
    over = snap(active=5, max_concurrency=5, over_limit_seconds=0.31)
    panel = render_panel(over, limit=4, duration=30.0)
    text = plain(panel)
    assert "5/4" in text
    assert "0.31 s" in text
    assert any(is_red(s) for s in styles_of(panel, "0.31 s"))
    assert any(is_red(s) for s in styles_of(panel, "5/4"))


@pytest.mark.unit
def test_panel_measures_against_the_api_limit_not_the_pool_size() -> None:
    # Scenario.api_limit below the slot count: the overrun must show.
    panel = render_panel(snap(max_concurrency=4), limit=3, slots=4, duration=30.0)
    text = plain(panel)
    assert "4/3" in text  # the bar and the peak
    assert "4/4" in text  # busy slots, out of the pool's 4
    assert any(is_red(s) for s in styles_of(panel, "4/3"))


@pytest.mark.unit
def test_panel_fits_an_80_column_terminal() -> None:
    lines = plain(render_panel(snap(), limit=4, duration=30.0), width=80).splitlines()
    assert lines
    assert max(len(line) for line in lines) <= 80
    # Not wrapped: the first row of figures stays on one line.
    assert any("peak" in line and "over limit" in line and "utilization" in line for line in lines)


@pytest.mark.unit
def test_panel_before_the_first_snapshot_says_it_is_starting() -> None:
    scenario = Scenario(slots=3, duration=10.0)
    view = LiveView(scenario)
    text = plain(view)
    assert "0/3" in text
    assert "starting" in text
    view.update(replace(snap(limit=3, active=3, busy_slots=3), elapsed=1.0, duration=10.0))
    assert view.phase == "running"
    assert "starting" not in plain(view)
    view.update(replace(snap(limit=3), elapsed=10.0, duration=10.0))
    assert view.phase == "draining"
    view.stopping()
    view.update(replace(snap(limit=3), elapsed=10.0, duration=10.0))
    assert view.phase == "stopping"  # a late tick does not hide the stop


@pytest.mark.unit
def test_rate_meter_uses_a_window_of_recent_ticks() -> None:
    meter = RateMeter(window=2.0)
    assert meter.add(0.25, 10) == pytest.approx(40.0)
    for i in range(2, 13):  # 40 calls/s for 3 s
        meter.add(0.25 * i, 10 * i)
    assert meter.rate == pytest.approx(40.0)
    meter.add(3.25, 120)  # a stalled tick moves the figure a little, not to zero
    assert 30.0 < meter.rate < 40.0


@pytest.mark.unit
def test_progress_line_has_the_key_figures() -> None:
    line = progress_line(snap(), 37.9)
    for expected in ("12.3/30 s", "in calls 4/4", "over limit 0.00 s", "97.5 %", "37.9 calls/s"):
        assert expected in line


# -- the scenario ------------------------------------------------------------------------


@pytest.mark.unit
def test_chaos_interval_scales_with_the_pool_and_has_a_floor() -> None:
    assert chaos_interval(1) == 8.0
    assert chaos_interval(4) == 2.0
    assert chaos_interval(8) == 1.0
    assert chaos_interval(100) == 1.0


@pytest.mark.unit
def test_build_scenario_from_the_cli_arguments() -> None:
    quiet = build_scenario(demo_args(slots=3, duration=4.0, seed=7))
    assert (quiet.slots, quiet.duration, quiet.call_ms, quiet.seed) == (3, 4.0, 100.0, 7)
    assert quiet.chaos is None
    assert quiet.liveness_window == 2.0
    assert quiet.redis_url is None
    noisy = build_scenario(demo_args(slots=4, chaos=True, redis_url="redis://127.0.0.1:1/0"))
    assert noisy.chaos is not None
    assert noisy.chaos.interval == 2.0
    assert noisy.redis_url == "redis://127.0.0.1:1/0"
    assert build_scenario(demo_args(call_ms=3000.0)).call_timeout >= 6.0


@pytest.mark.unit
def test_zero_slots_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="slots"):
        build_scenario(demo_args(slots=0))
    assert run_demo(demo_args(slots=0, json=True)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--slots must be >= 1" in captured.err


# -- the summary and the verdict -----------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("changes", "cap_held", "nothing_lost"),
    [
        ({}, True, True),
        ({"max_concurrency": 5}, False, True),
        ({"over_limit_seconds": 0.01}, False, True),
        ({"max_concurrency": 3}, True, True),
        ({"lost": 1}, True, False),
        ({"duplicated": 1}, True, False),
        ({"unfinished": 2}, True, False),
        ({"dead": 3, "expired": 1}, True, True),  # accounted for: not lost
        ({"max_concurrency": 6, "lost": 1}, False, False),
        ({"limit": 3}, False, True),  # 4 connections against an API limit of 3
    ],
)
def test_verdict(changes: dict[str, Any], cap_held: bool, nothing_lost: bool) -> None:
    v = verdict(result(**changes))
    assert (v.cap_held, v.nothing_lost, v.ok) == (cap_held, nothing_lost, cap_held and nothing_lost)


@pytest.mark.unit
def test_verdict_line() -> None:
    good = verdict_text(result())
    assert "cap held" in good.plain
    assert "nothing lost" in good.plain
    assert not any(is_red(str(span.style)) for span in good.spans)
    bad = verdict_text(result(max_concurrency=5, over_limit_seconds=0.2, lost=1))
    assert "cap broken" in bad.plain
    assert "0.20 s" in bad.plain
    assert "lost 1 · duplicated 0 · unfinished 0" in bad.plain
    assert len(bad.plain) <= 80
    assert all(is_red(str(span.style)) for span in bad.spans)


@pytest.mark.unit
def test_faults_by_kind_always_lists_every_slot_fault_kind() -> None:
    assert faults_by_kind(result()) == {"kill": 2, "stop_short": 0, "stop_long": 1}
    assert faults_by_kind(result(faults=[])) == dict.fromkeys(FAULT_KINDS, 0)


@pytest.mark.unit
def test_recovery_text() -> None:
    assert recovery_text([]) == "none"
    assert recovery_text([0.1, 0.3, 0.2]) == "median 0.20 s · max 0.30 s (n=3)"


@pytest.mark.unit
def test_summary_rows() -> None:
    rows = {
        label: (value, style)
        for _, section in summary_sections(result())
        for label, value, style in section
    }
    assert rows["max concurrency"] == ("4 / limit 4", "green")
    assert rows["over the limit"][0] == "0.00 s"
    assert rows["utilization"][0] == "93.0 %"
    assert rows["goodput"][0] == "81.0 %"
    assert rows["throughput"][0].startswith("36.7 calls/s")
    for label in ("submitted", "completed", "dead", "expired", "lost", "duplicated", "unfinished"):
        assert label in rows
    assert rows["lost"] == ("0", "green")
    assert rows["faults injected"][0] == "kill 2 · stop_short 0 · stop_long 1"
    assert rows["kill → busy again"][0] == "median 0.21 s · max 0.30 s (n=2)"
    assert rows["hang → detected"][0].startswith("median 2.40 s")
    assert rows["hang → busy again"][0].startswith("median 2.70 s")

    bad = {
        label: (value, style)
        for _, section in summary_sections(
            result(max_concurrency=5, lost=2, dead=1, dead_reasons=["http 500"])
        )
        for label, value, style in section
    }
    assert is_red(bad["max concurrency"][1])
    assert bad["lost"] == ("2", "bold red")
    assert bad["first dead reason"][0] == "http 500"


@pytest.mark.unit
def test_summary_without_chaos_leaves_out_recovery_times() -> None:
    rows = {
        label: value
        for _, section in summary_sections(result(chaos=False, faults=[], kill_recovery=[]))
        for label, value, _ in section
    }
    assert rows["faults injected"] == "none"
    assert "kill → busy again" not in rows


@pytest.mark.unit
def test_summary_renders_with_its_verdict() -> None:
    text = plain(render_summary(result()), width=100)
    for expected in ("max concurrency", "4 / limit 4", "unfinished", "stop_long 1", "cap held"):
        assert expected in text


@pytest.mark.unit
def test_summary_fits_an_80_column_terminal() -> None:
    many = result(faults=[Fault(float(i), "stop_short", 0, i) for i in range(1000)])
    lines = plain(render_summary(many), width=200).splitlines()
    assert max(len(line) for line in lines) <= 80


@pytest.mark.unit
def test_json_document() -> None:
    doc = result_doc(result(lost=1))
    assert doc["limit"] == 4
    assert doc["cap_held"] is True
    assert doc["nothing_lost"] is False
    assert doc["faults_by_kind"] == {"kill": 2, "stop_short": 0, "stop_long": 1}
    assert doc["throughput"] == pytest.approx(1100 / 30.0)
    assert doc["faults"][0] == {
        "at": 1.0,
        "kind": "kill",
        "slot": 0,
        "pid": 100,
        "wall": 0.0,
        "in_call": False,
    }
    assert "timeline" not in doc
    assert json.loads(json.dumps(doc)) == doc


# -- the real CLI --------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "operator"), PYTHONUNBUFFERED="1")
    env.pop("APIPOOL_REDIS_URL", None)  # the demo must start its own throwaway redis-server
    return env


def run_cli(*args: str, timeout: float = 90.0) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "apipool", "demo", *args],
        env=cli_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(
            f"stdout is not one JSON object (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    assert isinstance(doc, dict)
    return proc.returncode, doc, proc.stderr


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_demo_json_holds_the_cap_and_loses_nothing() -> None:
    code, doc, stderr = run_cli("--duration", "4", "--slots", "3", "--json")
    assert doc["limit"] == 3
    assert doc["max_concurrency"] <= 3
    assert doc["over_limit_seconds"] == 0
    assert doc["lost"] == 0
    assert doc["duplicated"] == 0
    assert doc["unfinished"] == 0
    assert doc["utilization"] > 0.8, doc
    assert doc["completed"] > 0
    assert doc["cap_held"] is True
    assert doc["nothing_lost"] is True
    assert doc["chaos"] is False
    assert doc["faults_by_kind"] == dict.fromkeys(FAULT_KINDS, 0)
    assert code == 0, stderr


def early_fault_seed(slots: int) -> int:
    """A seed whose first chaos interval is short, so a 6 s run surely sees a fault.

    The harness draws the wait before each fault from ``random.Random(seed)``, the
    first draw first; at one fault every 8 / 3 s on average, an unlucky unseeded
    run would see none in 6 s about one time in ten.
    """
    return next(
        seed
        for seed in range(1000)
        if random.Random(seed).expovariate(1.0 / chaos_interval(slots)) < 1.0
    )


@pytest.mark.redis
@pytest.mark.chaos
@pytest.mark.timeout(120)
def test_demo_with_chaos_holds_the_cap_and_loses_nothing() -> None:
    seed = early_fault_seed(3)
    code, doc, stderr = run_cli(
        "--chaos", "--duration", "6", "--slots", "3", "--seed", str(seed), "--json"
    )
    assert doc["chaos"] is True
    assert doc["limit"] == 3
    assert len(doc["faults"]) > 0, doc
    assert sum(doc["faults_by_kind"].values()) == len(doc["faults"])
    assert doc["max_concurrency"] <= 3, doc["over_limit_events"]
    assert doc["over_limit_seconds"] == 0, doc["over_limit_events"]
    assert doc["cap_held"] is True
    assert (doc["lost"], doc["duplicated"], doc["unfinished"]) == (0, 0, 0), doc
    assert doc["nothing_lost"] is True
    assert code == 0, stderr


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the ")"
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.redis
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.timeout(90)
def test_ctrl_c_stops_everything_and_exits_130() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "apipool", "demo", "--duration", "60", "--slots", "2", "--json"],
        env=cli_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # redis-server and two slot processes: the pool is up and running.
        deadline = time.monotonic() + 30
        while len(children_of(proc.pid)) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, "the demo did not start its processes"
            time.sleep(0.05)
        time.sleep(1.0)
        started = children_of(proc.pid)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert out == ""
    assert len(started) >= 3
    left = [pid for pid in started if alive(pid)]
    assert not left, f"still running after the demo exited: {left}"
