"""The live panel: what a terminal shows while the demo runs.

:func:`render_panel` draws one :class:`~apipool.testing.harness.Snapshot`;
:class:`LiveView` holds the latest one and the run's phase for ``rich.live.Live``,
and :func:`logs_above` keeps log records from tearing through the panel.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from rich import box
from rich.console import Console, Group, RenderableType
from rich.logging import RichHandler
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ..testing.harness import Scenario, Snapshot
from .figures import (
    BAD,
    BAR_WIDTH,
    DIM,
    GOOD,
    WARN,
    RateMeter,
    concurrency_bar,
    connections_text,
    over_limit_text,
    peak_text,
    percent,
    utilization_style,
)
from .slot_states import LedgerWatch, Shares, states_bar

__all__ = ["PANEL_WIDTH", "LiveView", "logs_above", "render_panel"]

PANEL_WIDTH = 76
"""Fixed, so the panel does not change size between starting and running; fits 80 columns."""
LABEL_WIDTH = 13

Cell = tuple[str, Text]
"""(label, value) of one figure in the panel's grid."""


def _labelled(label: str, value: Text) -> Text:
    return Text(f"{label:<{LABEL_WIDTH}}", style=DIM) + value


def _grid(rows: Sequence[Sequence[Cell]]) -> Table:
    grid = Table.grid(padding=(0, 1))
    for _ in range(len(rows[0])):
        grid.add_column(style=DIM, no_wrap=True)
        grid.add_column(justify="right", no_wrap=True, min_width=9)
        grid.add_column(width=2)
    for row in rows:
        cells: list[Text | str] = []
        for label, value in row:
            cells += [label, value, ""]
        grid.add_row(*cells)
    return grid


def _figures(snap: Snapshot, limit: int, pool: int, rate: float) -> Table:
    """Three rows of figures: the cap, the pool's work, the counters."""
    util = Text(percent(snap.utilization), style=utilization_style(snap.utilization))
    busy = Text(f"{snap.busy_slots}/{pool}", style=GOOD if snap.busy_slots >= pool else WARN)
    return _grid(
        [
            [
                ("peak", peak_text(snap.max_concurrency, limit)),
                ("over limit", over_limit_text(snap.over_limit_seconds)),
                ("utilization", util),
            ],
            [
                ("queued", Text(f"{snap.queued:,}")),
                ("busy slots", busy),
                ("throughput", Text(f"{rate:,.1f}/s")),
            ],
            [
                ("ok calls", Text(f"{snap.ok_calls:,}")),
                ("restarts", Text(f"{snap.restarts:,}", style=WARN if snap.restarts else "")),
                ("faults", Text(f"{snap.faults:,}", style=WARN if snap.faults else "")),
            ],
        ]
    )


def _clock(elapsed: float, duration: float) -> Table:
    clock = Table.grid(padding=(0, 1))
    clock.add_column(width=LABEL_WIDTH, style=DIM)
    clock.add_column()
    clock.add_column(no_wrap=True)
    clock.add_row(
        "elapsed",
        ProgressBar(total=duration, completed=elapsed, width=BAR_WIDTH),
        Text(f"{elapsed:5.1f} / {duration:g} s"),
    )
    return clock


def render_panel(
    snap: Snapshot | None,
    *,
    limit: int,
    duration: float,
    throughput: float | None = None,
    chaos: bool = False,
    call_ms: float = 100.0,
    status: RenderableType | None = None,
    slots: int | None = None,
    states: Shares | None = None,
) -> Panel:
    """The live panel for the latest snapshot (``None``: still starting).

    ``limit`` is the stand-in API's limit and ``slots`` the pool's size (default:
    the limit). ``throughput`` defaults to the snapshot's own (one tick) figure;
    ``status`` is a line shown under the progress bar (starting, draining, ...);
    ``states``: the shares of the slots' time by state (slot_states.py).
    """
    if snap is None:
        in_flight = active = peak = 0
    else:
        in_flight, active, peak = snap.in_flight, snap.active, snap.max_concurrency
    parts: list[RenderableType] = [
        _labelled("in calls", concurrency_bar(in_flight, limit)),
        _labelled("connections", connections_text(active, peak, limit)),
    ]
    if snap is not None:
        rate = snap.throughput if throughput is None else throughput
        parts += [Text(), _figures(snap, limit, limit if slots is None else slots, rate)]
    if states:
        bar, legend = states_bar(states)
        parts += [Text(), _labelled("slot time", bar), _labelled("", legend)]
    elapsed = 0.0 if snap is None else min(snap.elapsed, duration)
    parts += [Text(), _clock(elapsed, duration)]
    if status is not None:
        parts.append(status)
    return Panel(
        Group(*parts),
        title=Text.assemble(("apipool demo", "bold"), (f" · stand-in API limit {limit}", DIM)),
        subtitle=Text(
            f"{call_ms:g} ms calls · chaos {'on' if chaos else 'off'} · Ctrl-C stops", style=DIM
        ),
        box=box.ROUNDED,
        border_style="blue",
        width=PANEL_WIDTH,
        padding=(1, 2),
    )


BUSY_PHASES = {
    "starting": "starting redis-server, the stand-in API and {slots} slot processes…",
    "draining": "stopping the load, draining the queue and accounting for every job…",
    "stopping": "stopping the slots, the stand-in API and redis-server…",
}
"""Phases shown with a spinner, and what the demo is doing meanwhile."""
FINAL_PHASES = {"interrupted": "interrupted", "failed": "the run failed"}
"""Phases that end a run early, shown in red."""
MEASURING_PHASES = ("starting", "running")
"""Phases before the measurement is over."""


class LiveView:
    """State behind the live panel; ``rich.live.Live`` renders it at every refresh.

    ``phase`` goes starting → running → draining → (stopping) → done, or ends in
    ``interrupted`` or ``failed``.
    """

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.snap: Snapshot | None = None
        self.meter = RateMeter()
        self.phase = "starting"
        self._spinner = Spinner("dots", style="blue")
        self.ledger: LedgerWatch | None = None
        self.states: Shares | None = None

    def watch(self, redis_url: str) -> None:
        """The run's Redis is up: follow the pool's ledger (slot_states.py)."""
        self.ledger = LedgerWatch(redis_url, self.scenario.slots)

    def update(self, snap: Snapshot) -> None:
        self.meter.add(snap.elapsed, snap.ok_calls)
        self.snap = snap
        if self.ledger is not None and self.phase in MEASURING_PHASES:
            self.states = self.ledger.refresh()
        if self.phase in MEASURING_PHASES:
            self.phase = "draining" if snap.elapsed >= snap.duration else "running"

    def stopping(self) -> None:
        self.phase = "stopping"

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    def status(self) -> RenderableType | None:
        if self.phase in FINAL_PHASES:
            return Text(FINAL_PHASES[self.phase], style=BAD)
        what = BUSY_PHASES.get(self.phase)
        if what is None:
            return None
        self._spinner.update(text=Text(what.format(slots=self.scenario.slots), style=DIM))
        return self._spinner

    def __rich__(self) -> Panel:
        s = self.scenario
        return render_panel(
            self.snap,
            limit=s.api_limit or s.slots,
            slots=s.slots,
            duration=s.duration,
            throughput=self.meter.rate,
            chaos=s.chaos is not None,
            call_ms=s.call_ms,
            status=self.status(),
            states=self.states,
        )


@contextlib.contextmanager
def logs_above(console: Console, view: LiveView) -> Iterator[None]:
    """Route log records above the live panel instead of tearing through it.

    Once the measurement is over, the supervisor's routine news (each slot
    exiting and stopping) is left out; warnings and errors always show.
    """
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = RichHandler(console=console, show_path=False, markup=False, log_time_format="%X")
    handler.addFilter(
        lambda record: record.levelno >= logging.WARNING or view.phase in MEASURING_PHASES
    )
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved
