"""The end of a run: the verdict, the summary table and the ``--json`` document.

Everything here is a pure function of a :class:`~apipool.testing.harness.ScenarioResult`.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..exitcodes import ExitCode
from ..testing.harness import FAULT_KINDS, ScenarioResult
from .figures import BAD, DIM, GOOD, WARN, percent, utilization_style

__all__ = [
    "Row",
    "Verdict",
    "faults_by_kind",
    "recovery_text",
    "render_summary",
    "result_doc",
    "summary_sections",
    "verdict",
    "verdict_text",
]


@dataclass(frozen=True)
class Verdict:
    cap_held: bool
    """The stand-in never saw more connections than its limit."""
    nothing_lost: bool
    """Every accepted job has exactly one result."""

    @property
    def ok(self) -> bool:
        return self.cap_held and self.nothing_lost

    @property
    def exit_code(self) -> ExitCode:
        """``OK`` when the cap held and nothing was lost, else ``CHECK_FAILED``."""
        return ExitCode.OK if self.ok else ExitCode.CHECK_FAILED


def verdict(result: ScenarioResult) -> Verdict:
    return Verdict(
        cap_held=result.max_concurrency <= result.limit and result.over_limit_seconds == 0,
        nothing_lost=result.lost == 0 and result.duplicated == 0 and result.unfinished == 0,
    )


def verdict_text(result: ScenarioResult) -> Text:
    """The one-line verdict, e.g. ``✔ cap held (peak 4/4)   ✔ nothing lost (812 jobs)``."""
    v, r = verdict(result), result
    text = Text()
    if v.cap_held:
        text.append(f"✔ cap held (peak {r.max_concurrency}/{r.limit})", style=GOOD)
    else:
        text.append(
            f"✘ cap broken (peak {r.max_concurrency}/{r.limit}, {r.over_limit_seconds:.2f} s over)",
            style=BAD,
        )
    text.append("   ")
    if v.nothing_lost:
        text.append(f"✔ nothing lost ({r.submitted:,} jobs accounted for)", style=GOOD)
    else:
        text.append(
            f"✘ lost {r.lost} · duplicated {r.duplicated} · unfinished {r.unfinished}",
            style=BAD,
        )
    return text


def faults_by_kind(result: ScenarioResult) -> dict[str, int]:
    """Injected faults per kind; the slot fault kinds are always present."""
    counts: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
    counts.update(Counter(f.kind for f in result.faults))
    return counts


def recovery_text(seconds: Sequence[float]) -> str:
    """``median 0.15 s · max 0.31 s (n=3)``, or ``none`` when nothing was measured."""
    if not seconds:
        return "none"
    return (
        f"median {statistics.median(seconds):.2f} s · max {max(seconds):.2f} s (n={len(seconds)})"
    )


Row = tuple[str, str, str]
"""(label, value, style) of one summary line; style ``""`` is the default."""


def _zero_good(n: float) -> str:
    return GOOD if n == 0 else BAD


def _cap_rows(r: ScenarioResult) -> list[Row]:
    spans = f" in {len(r.over_limit_events)} spans" if r.over_limit_events else ""
    return [
        (
            "max concurrency",
            f"{r.max_concurrency} / limit {r.limit}",
            GOOD if verdict(r).cap_held else BAD,
        ),
        (
            "over the limit",
            f"{r.over_limit_seconds:.2f} s{spans}",
            _zero_good(r.over_limit_seconds),
        ),
        ("rejected (429)", f"{r.rejected:,}", _zero_good(r.rejected)),
    ]


def _usage_rows(r: ScenarioResult) -> list[Row]:
    calls = f"{r.throughput:,.1f} calls/s ({r.api_calls_ok:,} ok in {r.duration:.1f} s)"
    return [
        ("utilization", percent(r.utilization), utilization_style(r.utilization)),
        ("goodput", percent(r.goodput), ""),
        ("throughput", calls, ""),
    ]


def _job_rows(r: ScenarioResult) -> list[Row]:
    rows: list[Row] = [
        ("submitted", f"{r.submitted:,}", ""),
        ("completed", f"{r.completed:,}", GOOD if r.completed else ""),
        ("dead", f"{r.dead:,}", WARN if r.dead else ""),
        ("expired", f"{r.expired:,}", WARN if r.expired else ""),
        ("lost", f"{r.lost:,}", _zero_good(r.lost)),
        ("duplicated", f"{r.duplicated:,}", _zero_good(r.duplicated)),
        ("unfinished", f"{r.unfinished:,}", _zero_good(r.unfinished)),
    ]
    if r.dead_reasons:
        rows.append(("first dead reason", r.dead_reasons[0][:70], WARN))
    return rows


def _fault_rows(r: ScenarioResult) -> list[Row]:
    rows: list[Row] = [("restarts", f"{r.restarts:,}", "")]
    if not (r.chaos or r.faults):
        return [*rows, ("faults injected", "none", "")]
    kinds = " · ".join(f"{kind} {n}" for kind, n in faults_by_kind(r).items())
    return [
        *rows,
        ("faults injected", kinds, ""),
        ("kill → busy again", recovery_text(r.kill_recovery), ""),
        ("hang → detected", recovery_text(r.hang_detection), ""),
        ("hang → busy again", recovery_text(r.hang_recovery), ""),
    ]


def summary_sections(result: ScenarioResult) -> list[tuple[str, list[Row]]]:
    """The summary as titled sections of rows, in display order."""
    return [
        ("cap", _cap_rows(result)),
        ("usage", _usage_rows(result)),
        ("jobs", _job_rows(result)),
        ("faults", _fault_rows(result)),
    ]


def render_summary(result: ScenarioResult) -> Group:
    """The final summary table followed by the verdict line."""
    table = Table(
        title=Text(
            f"apipool demo: {result.slots} slots against a limit of {result.limit}, "
            f"{result.duration:.1f} s{', chaos' if result.chaos else ''}",
            style="bold",
        ),
        box=box.ROUNDED,
        show_header=False,
        border_style="blue",
        padding=(0, 1),
    )
    table.add_column(style="bold blue", no_wrap=True)
    table.add_column(style=DIM, no_wrap=True)
    table.add_column()
    for n, (title, rows) in enumerate(summary_sections(result)):
        if n:
            table.add_section()
        for i, (label, value, style) in enumerate(rows):
            table.add_row(title if i == 0 else "", label, Text(value, style=style))
    return Group(table, verdict_text(result))


def result_doc(result: ScenarioResult) -> dict[str, Any]:
    """The ``--json`` document: ``ScenarioResult.to_dict()`` plus the verdict."""
    v = verdict(result)
    doc = result.to_dict()
    doc["limit"] = result.limit
    doc["cap_held"] = v.cap_held
    doc["nothing_lost"] = v.nothing_lost
    doc["faults_by_kind"] = faults_by_kind(result)
    return doc
