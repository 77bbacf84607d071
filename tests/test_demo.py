"""``apipool demo``, the pure parts: the scenario, the live panel, the summary and the verdict.

The command itself (exit codes, the real CLI end to end) is in ``test_demo_cli.py``.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from rich.console import Console, RenderableType
from rich.text import Text

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
    summary_sections,
    verdict,
    verdict_text,
)
from apipool.testing.harness import FAULT_KINDS, Fault, Scenario, ScenarioResult, Snapshot

pytestmark = pytest.mark.unit


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


def span_styles(text: Text) -> list[str]:
    """The styles of a text's spans."""
    return [str(span.style) for span in text.spans if span.style]


def is_red(style: str) -> bool:
    return "red" in style.split()


def is_green(style: str) -> bool:
    return "green" in style.split()


def summary_rows(r: ScenarioResult) -> dict[str, tuple[str, str]]:
    """The summary's rows by label: (value, style)."""
    return {
        label: (value, style)
        for _, section in summary_sections(r)
        for label, value, style in section
    }


# -- the live panel ------------------------------------------------------------------


def test_bar_at_the_limit_is_full_and_green() -> None:
    bar = concurrency_bar(4, 4)
    assert bar.plain.endswith(" 4/4")
    assert "█" in bar.plain
    assert "░" not in bar.plain
    assert all(is_green(style) for style in span_styles(bar))


def test_bar_below_the_limit_shows_free_slots() -> None:
    bar = concurrency_bar(2, 4)
    assert bar.plain.endswith(" 2/4")
    segments = bar.plain.rsplit(" ", 1)[0].split(" ")
    assert [set(s) for s in segments] == [{"█"}, {"█"}, {"░"}, {"░"}]


def test_bar_over_the_limit_is_red_past_a_mark() -> None:
    bar = concurrency_bar(5, 4)
    assert bar.plain.endswith(" 5/4")
    assert "┃" in bar.plain
    assert any(is_red(style) for style in span_styles(bar))


@pytest.mark.parametrize(("active", "limit"), [(0, 64), (1, 64), (64, 64), (80, 64), (3, 200)])
def test_bar_for_a_large_limit_keeps_its_width(active: int, limit: int) -> None:
    bar = concurrency_bar(active, limit)
    assert bar.plain.endswith(f" {active}/{limit}")
    assert len(bar.plain) <= BAR_WIDTH + BAR_WIDTH // 4 + 1 + len(f" {active}/{limit}")
    if active:
        assert "█" in bar.plain  # one connection open is never drawn as none


@pytest.mark.parametrize(
    ("seconds", "shown", "colour"), [(0.0, "0.00 s", is_green), (0.31, "0.31 s", is_red)]
)
def test_over_limit_seconds_green_at_zero_red_otherwise(
    seconds: float, shown: str, colour: Callable[[str], bool]
) -> None:
    text = over_limit_text(seconds)
    assert text.plain == shown
    assert colour(str(text.style))


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


@pytest.mark.parametrize(
    ("changes", "limit", "slots", "colours"),
    [
        pytest.param({}, 4, None, {"0.00 s": is_green, "4/4": is_green}, id="at the limit"),
        pytest.param(
            {"active": 5, "max_concurrency": 5, "over_limit_seconds": 0.31},
            4,
            None,
            {"0.31 s": is_red, "5/4": is_red},
            id="over the limit",
        ),
        # Scenario.api_limit below the slot count: the overrun must show, in the bar
        # and the peak, while the busy slots count out of the pool's 4.
        pytest.param(
            {"max_concurrency": 4},
            3,
            4,
            {"4/3": is_red, "4/4": is_green},
            id="api limit below the pool size",
        ),
    ],
)
def test_panel_colours(
    changes: dict[str, Any],
    limit: int,
    slots: int | None,
    colours: dict[str, Callable[[str], bool]],
) -> None:
    panel = render_panel(snap(**changes), limit=limit, slots=slots, duration=30.0)
    text = plain(panel)
    for needle, colour in colours.items():
        other = is_red if colour is is_green else is_green
        assert needle in text, needle
        styles = styles_of(panel, needle)
        assert any(colour(s) for s in styles), (needle, styles)
        assert not any(other(s) for s in styles), (needle, styles)


def test_panel_fits_an_80_column_terminal() -> None:
    lines = plain(render_panel(snap(), limit=4, duration=30.0), width=80).splitlines()
    assert lines
    assert max(len(line) for line in lines) <= 80
    # Not wrapped: the first row of figures stays on one line.
    assert any("peak" in line and "over limit" in line and "utilization" in line for line in lines)


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


@pytest.mark.parametrize(
    ("phase", "shown"), [("interrupted", "interrupted"), ("failed", "the run failed")]
)
def test_panel_of_a_run_that_ended_early_says_so_in_red(phase: str, shown: str) -> None:
    view = LiveView(Scenario(slots=3, duration=10.0))
    view.phase = phase
    assert shown in plain(view)
    assert any(is_red(s) for s in styles_of(view, shown))


def test_rate_meter_uses_a_window_of_recent_ticks() -> None:
    meter = RateMeter(window=2.0)
    assert meter.add(0.25, 10) == pytest.approx(40.0)
    for i in range(2, 13):  # 40 calls/s for 3 s
        meter.add(0.25 * i, 10 * i)
    assert meter.rate == pytest.approx(40.0)
    meter.add(3.25, 120)  # a stalled tick moves the figure a little, not to zero
    assert 30.0 < meter.rate < 40.0


def test_progress_line_has_the_key_figures() -> None:
    line = progress_line(snap(), 37.9)
    for expected in ("12.3/30 s", "in calls 4/4", "over limit 0.00 s", "97.5 %", "37.9 calls/s"):
        assert expected in line


# -- the scenario ------------------------------------------------------------------------


@pytest.mark.parametrize(("slots", "interval"), [(1, 8.0), (4, 2.0), (8, 1.0), (100, 1.0)])
def test_chaos_interval_scales_with_the_pool_and_has_a_floor(slots: int, interval: float) -> None:
    assert chaos_interval(slots) == interval


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


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"slots": 0}, "--slots must be >= 1"),
        ({"duration": 0.0}, "--duration and --call-ms must be > 0"),
        ({"call_ms": -1.0}, "--duration and --call-ms must be > 0"),
    ],
)
def test_build_scenario_rejects_bad_arguments(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_scenario(demo_args(**changes))


# -- the summary and the verdict -----------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "cap_held", "nothing_lost", "exit_code"),
    [
        ({}, True, True, 0),
        ({"max_concurrency": 5}, False, True, 7),
        ({"over_limit_seconds": 0.01}, False, True, 7),
        ({"max_concurrency": 3}, True, True, 0),
        ({"lost": 1}, True, False, 7),
        ({"duplicated": 1}, True, False, 7),
        ({"unfinished": 2}, True, False, 7),
        ({"dead": 3, "expired": 1}, True, True, 0),  # accounted for: not lost
        ({"max_concurrency": 6, "lost": 1}, False, False, 7),
        ({"limit": 3}, False, True, 7),  # 4 connections against an API limit of 3
    ],
)
def test_verdict(
    changes: dict[str, Any], cap_held: bool, nothing_lost: bool, exit_code: int
) -> None:
    v = verdict(result(**changes))
    assert (v.cap_held, v.nothing_lost, v.ok) == (cap_held, nothing_lost, cap_held and nothing_lost)
    assert v.exit_code == exit_code


def test_verdict_line() -> None:
    good = verdict_text(result())
    assert "cap held" in good.plain
    assert "nothing lost" in good.plain
    assert not any(is_red(style) for style in span_styles(good))
    bad = verdict_text(result(max_concurrency=5, over_limit_seconds=0.2, lost=1))
    assert "cap broken" in bad.plain
    assert "0.20 s" in bad.plain
    assert "lost 1 · duplicated 0 · unfinished 0" in bad.plain
    assert len(bad.plain) <= 80
    assert all(is_red(style) for style in span_styles(bad))


def test_faults_by_kind_always_lists_every_slot_fault_kind() -> None:
    assert faults_by_kind(result()) == {"kill": 2, "stop_short": 0, "stop_long": 1}
    assert faults_by_kind(result(faults=[])) == dict.fromkeys(FAULT_KINDS, 0)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [([], "none"), ([0.1, 0.3, 0.2], "median 0.20 s · max 0.30 s (n=3)")],
)
def test_recovery_text(seconds: list[float], shown: str) -> None:
    assert recovery_text(seconds) == shown


def test_summary_rows() -> None:
    rows = summary_rows(result())
    assert rows["max concurrency"] == ("4 / limit 4", "green")
    assert rows["lost"] == ("0", "green")
    expected = {
        "over the limit": "0.00 s",
        "utilization": "93.0 %",
        "goodput": "81.0 %",
        "throughput": "36.7 calls/s (1,100 ok in 30.0 s)",
        "submitted": "1,120",
        "completed": "1,120",
        "dead": "0",
        "expired": "0",
        "lost": "0",
        "duplicated": "0",
        "unfinished": "0",
        "faults injected": "kill 2 · stop_short 0 · stop_long 1",
        "kill → busy again": "median 0.21 s · max 0.30 s (n=2)",
        "hang → detected": "median 2.40 s · max 2.40 s (n=1)",
        "hang → busy again": "median 2.70 s · max 2.70 s (n=1)",
    }
    assert {label: rows[label][0] for label in expected} == expected


def test_summary_rows_of_a_bad_run() -> None:
    rows = summary_rows(result(max_concurrency=5, lost=2, dead=1, dead_reasons=["http 500"]))
    assert is_red(rows["max concurrency"][1])
    assert rows["lost"] == ("2", "bold red")
    assert rows["first dead reason"][0] == "http 500"


def test_summary_without_chaos_leaves_out_recovery_times() -> None:
    rows = summary_rows(result(chaos=False, faults=[], kill_recovery=[]))
    assert rows["faults injected"][0] == "none"
    assert "kill → busy again" not in rows


def test_summary_renders_with_its_verdict() -> None:
    text = plain(render_summary(result()), width=100)
    for expected in ("max concurrency", "4 / limit 4", "unfinished", "stop_long 1", "cap held"):
        assert expected in text


def test_summary_fits_an_80_column_terminal() -> None:
    many = result(faults=[Fault(float(i), "stop_short", 0, i) for i in range(1000)])
    lines = plain(render_summary(many), width=200).splitlines()
    assert max(len(line) for line in lines) <= 80


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
