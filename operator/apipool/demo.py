"""``apipool demo``: a real pool against a limited stand-in API, watched live.

The demo runs :func:`apipool.testing.harness.run_scenario` (a throwaway ``redis-server``,
the stand-in API with a hard limit of N, N slot processes and producers that keep
work queued; with ``--chaos`` slots are SIGKILLed and SIGSTOPped at random) and
shows a live panel while it runs, then a summary and a verdict. The exit code is
0 only when the cap held and no job was lost, so the demo doubles as a smoke check.

Everything that decides what is shown is a small pure function of a
:class:`~apipool.testing.harness.Snapshot` or :class:`~apipool.testing.harness.ScenarioResult`, so
the tests can call it without running anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import statistics
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.logging import RichHandler
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from .errors import ApipoolError
from .testing.harness import (
    FAULT_KINDS,
    ChaosPlan,
    Scenario,
    ScenarioResult,
    Snapshot,
    run_scenario,
)
from .testing.redis_server import RedisServer

__all__ = [
    "BAR_WIDTH",
    "Interrupted",
    "LiveView",
    "RateMeter",
    "Verdict",
    "build_scenario",
    "chaos_interval",
    "concurrency_bar",
    "faults_by_kind",
    "over_limit_text",
    "progress_line",
    "recovery_text",
    "render_panel",
    "render_summary",
    "result_doc",
    "run_demo",
    "summary_sections",
    "verdict",
    "verdict_text",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# Stopped by a signal: 128 + its number (130 for Ctrl-C, 143 for SIGTERM).

TICK = 0.25
"""Seconds between snapshots from the harness; the live view refreshes at the same pace."""
REFRESH_PER_SECOND = 4
LIVENESS_WINDOW = 2.0
"""Seconds a slot may fail its /healthz probe before the supervisor kills it."""
RATE_WINDOW = 2.0
"""Seconds of history behind the throughput shown live (one tick alone is too jumpy)."""
PROGRESS_EVERY = 5.0
"""Seconds between progress lines on stderr when there is no live view."""
BAR_WIDTH = 32
PANEL_WIDTH = 76
"""Fixed, so the panel does not change size between starting and running; fits 80 columns."""

GOOD, WARN, BAD, DIM = "green", "yellow", "bold red", "grey50"


# -- the scenario ------------------------------------------------------------------


def chaos_interval(slots: int) -> float:
    """Mean seconds between injected slot faults for a pool of ``slots``.

    A fault costs the pool about 1.3 slot-seconds on average: a SIGKILL ~0.2 s
    until the restarted process is busy again, a short SIGSTOP 0.8 s, a permanent
    SIGSTOP ~3 s (the 2 s liveness window, the probe, the kill and the restart).
    One fault every ``8 / N`` seconds hits each slot about once every 8 s, so the
    pool loses roughly 1.3 / 8 ~ 15 % of its capacity whatever N is: a dip in the
    concurrency bar every couple of seconds and a dozen faults in the default 30 s
    run (4 slots), yet the pool spends most of its time at the limit. The floor of
    1 s keeps large pools from a fault storm that would show nothing but restarts.
    """
    return max(1.0, 8.0 / max(slots, 1))


def build_scenario(args: argparse.Namespace) -> Scenario:
    """The :class:`Scenario` for the parsed ``demo`` arguments; ``ValueError`` if invalid."""
    slots = int(args.slots)
    if slots < 1:
        raise ValueError(f"--slots must be >= 1, got {slots}")
    duration, call_ms = float(args.duration), float(args.call_ms)
    if duration <= 0 or call_ms <= 0:
        raise ValueError("--duration and --call-ms must be > 0")
    return Scenario(
        slots=slots,
        duration=duration,
        call_ms=call_ms,
        chaos=ChaosPlan(interval=chaos_interval(slots)) if args.chaos else None,
        # The harness's 2 s call timeout suits the default 100 ms calls; keep long
        # calls (--call-ms 3000) from timing out on every attempt.
        call_timeout=max(Scenario.call_timeout, 2.0 * call_ms / 1000.0),
        liveness_window=LIVENESS_WINDOW,
        redis_url=args.redis_url or None,
        seed=args.seed,
    )


# -- small formatting helpers ------------------------------------------------------


def percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f} %"


def utilization_style(fraction: float) -> str:
    return GOOD if fraction >= 0.9 else WARN if fraction >= 0.75 else BAD


def over_limit_text(seconds: float) -> Text:
    """``0.00 s`` in green when the limit was never exceeded, red otherwise."""
    return Text(f"{seconds:.2f} s", style=GOOD if seconds == 0 else BAD)


def peak_text(peak: int, limit: int) -> Text:
    return Text(f"{peak}/{limit}", style=GOOD if peak <= limit else BAD)


def concurrency_bar(active: int, limit: int, width: int = BAR_WIDTH) -> Text:
    """Calls (or connections) at the stand-in API against its limit, e.g. ``██ ██ ░░ 2/3``.

    Small limits get one segment per slot; larger ones a continuous bar scaled to
    ``width`` cells. Connections over the limit are drawn in red after a ``┃`` mark.
    """
    active, limit = max(active, 0), max(limit, 1)
    over = max(active - limit, 0)
    style = BAD if over else GOOD if active == limit else WARN
    bar = Text()
    if limit <= width // 3:
        seg = max(1, (width - (limit - 1)) // limit)
        cells = ["█" * seg if i < active else "░" * seg for i in range(limit)]
        for i, cell in enumerate(cells):
            if i:
                bar.append(" ")
            bar.append(cell, style=style if i < active else DIM)
        extra = " ".join(["█" * seg] * min(over, 3))
    else:
        filled = min(width, round(active * width / limit))
        if active and not filled:
            filled = 1
        bar.append("█" * filled, style=style)
        bar.append("░" * (width - filled), style=DIM)
        extra = "█" * min(width // 4, max(1, round(over * width / limit))) if over else ""
    if over:
        bar.append("┃", style=BAD)
        bar.append(extra, style=BAD)
    bar.append(f" {active}/{limit}", style=f"bold {style}" if style != BAD else BAD)
    return bar


def connections_text(active: int, peak: int, limit: int) -> Text:
    """Open connections at the stand-in (what its limit counts), e.g. ``4 open · peak 4 / 4``."""
    style = BAD if max(active, peak) > limit else DIM
    return Text(f"{active} open · peak {peak} / limit {limit}", style=style)


class RateMeter:
    """Calls per second over the last ``window`` seconds of (time, running total) points."""

    def __init__(self, window: float = RATE_WINDOW, start: tuple[float, int] = (0.0, 0)) -> None:
        self.window = window
        self._points: deque[tuple[float, int]] = deque([start])
        self.rate = 0.0

    def add(self, at: float, total: int) -> float:
        self._points.append((at, total))
        while len(self._points) > 2 and at - self._points[1][0] >= self.window:
            self._points.popleft()
        t0, n0 = self._points[0]
        self.rate = (total - n0) / (at - t0) if at > t0 else 0.0
        return self.rate


def progress_line(snap: Snapshot, throughput: float) -> str:
    """One plain line of progress, for stderr when there is no live view."""
    return (
        f"apipool demo: {snap.elapsed:5.1f}/{snap.duration:g} s  "
        f"in calls {snap.in_flight}/{snap.limit}  connections {snap.active}  "
        f"peak {snap.max_concurrency}  "
        f"over limit {snap.over_limit_seconds:.2f} s  util {percent(snap.utilization)}  "
        f"{throughput:.1f} calls/s  ok {snap.ok_calls}  restarts {snap.restarts}  "
        f"faults {snap.faults}"
    )


# -- the live panel ----------------------------------------------------------------


def _stats_grid(rows: Sequence[Sequence[tuple[str, Text]]]) -> Table:
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
) -> Panel:
    """The live panel for the latest snapshot (``None``: still starting).

    ``limit`` is the stand-in API's limit and ``slots`` the pool's size (default:
    the limit). ``throughput`` defaults to the snapshot's own (one tick) figure;
    ``status`` is a line shown under the progress bar (starting, draining, ...).
    """
    title = Text.assemble(("apipool demo", "bold"), (f" · stand-in API limit {limit}", DIM))
    subtitle = Text(
        f"{call_ms:g} ms calls · chaos {'on' if chaos else 'off'} · Ctrl-C stops", style=DIM
    )
    parts: list[RenderableType] = []
    if snap is None:
        parts.append(Text(f"{'in calls':<13}", style=DIM) + concurrency_bar(0, limit))
        parts.append(Text(f"{'connections':<13}", style=DIM) + connections_text(0, 0, limit))
    else:
        rate = snap.throughput if throughput is None else throughput
        parts.append(Text(f"{'in calls':<13}", style=DIM) + concurrency_bar(snap.in_flight, limit))
        parts.append(
            Text(f"{'connections':<13}", style=DIM)
            + connections_text(snap.active, snap.max_concurrency, limit)
        )
        parts.append(Text())
        pool = limit if slots is None else slots
        busy_style = GOOD if snap.busy_slots >= pool else WARN
        parts.append(
            _stats_grid(
                [
                    [
                        ("peak", peak_text(snap.max_concurrency, limit)),
                        ("over limit", over_limit_text(snap.over_limit_seconds)),
                        (
                            "utilization",
                            Text(
                                percent(snap.utilization),
                                style=utilization_style(snap.utilization),
                            ),
                        ),
                    ],
                    [
                        ("queued", Text(f"{snap.queued:,}")),
                        ("busy slots", Text(f"{snap.busy_slots}/{pool}", style=busy_style)),
                        ("throughput", Text(f"{rate:,.1f}/s")),
                    ],
                    [
                        ("ok calls", Text(f"{snap.ok_calls:,}")),
                        (
                            "restarts",
                            Text(f"{snap.restarts:,}", style=WARN if snap.restarts else ""),
                        ),
                        ("faults", Text(f"{snap.faults:,}", style=WARN if snap.faults else "")),
                    ],
                ]
            )
        )
    elapsed = 0.0 if snap is None else min(snap.elapsed, duration)
    clock = Table.grid(padding=(0, 1))
    clock.add_column(width=13, style=DIM)
    clock.add_column()
    clock.add_column(no_wrap=True)
    clock.add_row(
        "elapsed",
        ProgressBar(total=duration, completed=elapsed, width=BAR_WIDTH),
        Text(f"{elapsed:5.1f} / {duration:g} s"),
    )
    parts += [Text(), clock]
    if status is not None:
        parts.append(status)
    return Panel(
        Group(*parts),
        title=title,
        subtitle=subtitle,
        box=box.ROUNDED,
        border_style="blue",
        width=PANEL_WIDTH,
        padding=(1, 2),
    )


class LiveView:
    """State behind the live panel; ``rich.live.Live`` renders it at every refresh."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.snap: Snapshot | None = None
        self.meter = RateMeter()
        self.phase = "starting"
        self._spinner = Spinner("dots", style="blue")

    def update(self, snap: Snapshot) -> None:
        self.meter.add(snap.elapsed, snap.ok_calls)
        self.snap = snap
        if self.phase in ("starting", "running"):
            self.phase = "draining" if snap.elapsed >= snap.duration else "running"

    def stopping(self) -> None:
        self.phase = "stopping"

    def status(self) -> RenderableType | None:
        s = self.scenario
        if self.phase == "starting":
            what = f"starting redis-server, the stand-in API and {s.slots} slot processes…"
        elif self.phase == "draining":
            what = "stopping the load, draining the queue and accounting for every job…"
        elif self.phase == "stopping":
            what = "stopping the slots, the stand-in API and redis-server…"
        elif self.phase == "interrupted":
            return Text("interrupted", style=BAD)
        elif self.phase == "failed":
            return Text("the run failed", style=BAD)
        else:
            return None
        self._spinner.update(text=Text(what, style=DIM))
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
        )


# -- the summary -------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    cap_held: bool
    """The stand-in never saw more connections than its limit."""
    nothing_lost: bool
    """Every accepted job has exactly one result."""

    @property
    def ok(self) -> bool:
        return self.cap_held and self.nothing_lost


def verdict(result: ScenarioResult) -> Verdict:
    return Verdict(
        cap_held=result.max_concurrency <= result.limit and result.over_limit_seconds == 0,
        nothing_lost=result.lost == 0 and result.duplicated == 0 and result.unfinished == 0,
    )


def verdict_text(result: ScenarioResult) -> Text:
    """The one-line verdict, e.g. ``✔ cap held (peak 4/4)   ✔ nothing lost (812 jobs)``."""
    v = verdict(result)
    text = Text()
    if v.cap_held:
        text.append(f"✔ cap held (peak {result.max_concurrency}/{result.limit})", style=GOOD)
    else:
        text.append(
            f"✘ cap broken (peak {result.max_concurrency}/{result.limit}, "
            f"{result.over_limit_seconds:.2f} s over)",
            style=BAD,
        )
    text.append("   ")
    if v.nothing_lost:
        text.append(f"✔ nothing lost ({result.submitted:,} jobs accounted for)", style=GOOD)
    else:
        text.append(
            f"✘ lost {result.lost} · duplicated {result.duplicated} · "
            f"unfinished {result.unfinished}",
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


def _zero_good(n: int) -> str:
    return GOOD if n == 0 else BAD


def summary_sections(result: ScenarioResult) -> list[tuple[str, list[Row]]]:
    """The summary as titled sections of rows, in display order."""
    r, v = result, verdict(result)
    cap = [
        ("max concurrency", f"{r.max_concurrency} / limit {r.limit}", GOOD if v.cap_held else BAD),
        (
            "over the limit",
            f"{r.over_limit_seconds:.2f} s"
            + (f" in {len(r.over_limit_events)} spans" if r.over_limit_events else ""),
            _zero_good(0 if r.over_limit_seconds == 0 else 1),
        ),
        ("rejected (429)", f"{r.rejected:,}", _zero_good(r.rejected)),
    ]
    use = [
        ("utilization", percent(r.utilization), utilization_style(r.utilization)),
        ("goodput", percent(r.goodput), ""),
        (
            "throughput",
            f"{r.throughput:,.1f} calls/s ({r.api_calls_ok:,} ok in {r.duration:.1f} s)",
            "",
        ),
    ]
    jobs: list[Row] = [
        ("submitted", f"{r.submitted:,}", ""),
        ("completed", f"{r.completed:,}", GOOD if r.completed else ""),
        ("dead", f"{r.dead:,}", WARN if r.dead else ""),
        ("expired", f"{r.expired:,}", WARN if r.expired else ""),
        ("lost", f"{r.lost:,}", _zero_good(r.lost)),
        ("duplicated", f"{r.duplicated:,}", _zero_good(r.duplicated)),
        ("unfinished", f"{r.unfinished:,}", _zero_good(r.unfinished)),
    ]
    if r.dead_reasons:
        jobs.append(("first dead reason", r.dead_reasons[0][:70], WARN))
    kinds = faults_by_kind(r)
    faults: list[Row] = [
        ("restarts", f"{r.restarts:,}", ""),
        (
            "faults injected",
            " · ".join(f"{kind} {n}" for kind, n in kinds.items())
            if r.faults or r.chaos
            else "none",
            "",
        ),
    ]
    if r.chaos or r.faults:
        faults += [
            ("kill → busy again", recovery_text(r.kill_recovery), ""),
            ("hang → detected", recovery_text(r.hang_detection), ""),
            ("hang → busy again", recovery_text(r.hang_recovery), ""),
        ]
    return [
        ("cap", cap),
        ("usage", use),
        ("jobs", jobs),
        ("faults", faults),
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


# -- running -----------------------------------------------------------------------


class DemoError(Exception):
    """The demo could not run; the message says why."""


def _redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def _check_redis(url: str) -> None:
    """Fail fast and clearly on a wrong ``--redis-url`` (the harness would wait 30 s)."""
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=3.0, socket_connect_timeout=3.0, retry=Retry(NoBackoff(), 0)
        )
    except ValueError as exc:
        raise DemoError(f"bad --redis-url {_redact(url)!r}: {exc}") from None
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        raise DemoError(f"cannot reach Redis at {_redact(url)}: {exc}") from None
    finally:
        client.close()


@contextlib.contextmanager
def _with_redis(scenario: Scenario) -> Iterator[Scenario]:
    """The scenario with a reachable Redis: its own URL, or a throwaway redis-server.

    The demo starts the throwaway server itself instead of leaving it to the
    harness, which starts it before its ``try``: a Ctrl-C or SIGTERM that lands
    while it starts would otherwise leave an orphaned redis-server behind.
    """
    if scenario.redis_url:
        _check_redis(scenario.redis_url)
        yield scenario
        return
    with RedisServer() as server:
        yield dataclasses.replace(scenario, redis_url=server.url)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (Ctrl-C or SIGTERM) and has cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Outside the event loop, SIGTERM raises :class:`Interrupted` like Ctrl-C does."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Stop:
    """The first stop signal seen during a run, and who to tell about it."""

    def __init__(self, on_stop: Callable[[], None] | None = None) -> None:
        self.signum: int | None = None
        self.on_stop = on_stop


async def _main(
    scenario: Scenario, on_tick: Callable[[Snapshot], None], stop: _Stop
) -> ScenarioResult:
    # The first Ctrl-C (or SIGTERM) cancels this task: the harness's ``finally``
    # stops the slots and the stand-in API, then the cancellation surfaces from
    # asyncio.run. A second Ctrl-C is the plain KeyboardInterrupt again, for when
    # the cleanup itself hangs.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    outer_sigterm = signal.getsignal(signal.SIGTERM)
    installed: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        if stop.signum is None and task is not None:
            stop.signum = signum
            if stop.on_stop is not None:
                stop.on_stop()
            task.cancel()
        if signal.SIGINT in installed:
            installed.remove(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGINT)  # restores default_int_handler

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
    try:
        return await run_scenario(scenario, on_tick=on_tick, tick=TICK)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        if signal.SIGTERM in installed and outer_sigterm is not None:
            signal.signal(signal.SIGTERM, outer_sigterm)  # remove_signal_handler set SIG_DFL


def _run(
    scenario: Scenario,
    on_tick: Callable[[Snapshot], None],
    on_stop: Callable[[], None] | None = None,
) -> ScenarioResult:
    """Run the scenario to its end; :class:`Interrupted` if a signal stopped it."""
    stop = _Stop(on_stop)
    try:
        with _with_redis(scenario) as ready:
            return asyncio.run(_main(ready, on_tick, stop))
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT) from None
    except BaseException as exc:  # CancelledError, or whatever the cleanup raised after a signal
        if stop.signum is not None:
            raise Interrupted(stop.signum) from exc
        raise


@contextlib.contextmanager
def _logs_to(console: Console, view: LiveView) -> Iterator[None]:
    """Route log records above the live panel instead of tearing through it.

    Once the measurement is over, the supervisor's routine news (each slot
    exiting and stopping) is left out; warnings and errors always show.
    """
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = RichHandler(console=console, show_path=False, markup=False, log_time_format="%X")
    handler.addFilter(
        lambda record: record.levelno >= logging.WARNING or view.phase in ("starting", "running")
    )
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved


def _run_live(scenario: Scenario, console: Console) -> ScenarioResult:
    view = LiveView(scenario)
    with (
        Live(view, console=console, refresh_per_second=REFRESH_PER_SECOND) as live,
        _logs_to(live.console, view),
    ):
        try:
            result = _run(scenario, view.update, on_stop=view.stopping)
        except Interrupted:
            view.phase = "interrupted"
            raise
        except BaseException:
            view.phase = "failed"
            raise
        view.phase = "done"
    return result


class _ProgressLines:
    """``on_tick`` without a live view: a plain line on ``stream`` every few seconds."""

    def __init__(self, stream: TextIO, every: float = PROGRESS_EVERY) -> None:
        self.stream = stream
        self.every = every
        self.due = every
        self.meter = RateMeter()

    def __call__(self, snap: Snapshot) -> None:
        rate = self.meter.add(snap.elapsed, snap.ok_calls)
        if snap.elapsed + 1e-6 >= self.due:
            print(progress_line(snap, rate), file=self.stream, flush=True)
            self.due += self.every


def _run_plain(scenario: Scenario) -> ScenarioResult:
    print(
        f"apipool demo: {scenario.slots} slots against a stand-in API limited to "
        f"{scenario.api_limit or scenario.slots}, {scenario.duration:g} s"
        f"{', chaos' if scenario.chaos else ''}; starting",
        file=sys.stderr,
        flush=True,
    )
    return _run(
        scenario,
        _ProgressLines(sys.stderr),
        on_stop=lambda: print("apipool demo: stopping…", file=sys.stderr, flush=True),
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_demo(args: argparse.Namespace) -> int:
    """The ``demo`` subcommand; returns the exit code.

    0: the cap held and nothing was lost; 1: it did not, or the run failed;
    2: bad arguments; 130 (143): stopped by Ctrl-C (SIGTERM), after cleaning up.
    """
    as_json = bool(args.json)
    live = not as_json and sys.stdout.isatty()
    try:
        scenario = build_scenario(args)
    except ValueError as exc:
        print(f"apipool demo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Console(highlight=False)
    try:
        with _sigterm_interrupts():
            result = _run_live(scenario, out) if live else _run_plain(scenario)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        what = "interrupted" if signum == signal.SIGINT else "terminated"
        print(f"apipool demo: {what}; everything it started is stopped", file=sys.stderr)
        return 128 + signum
    except (DemoError, ApipoolError) as exc:
        print(f"apipool demo: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        print(f"apipool demo: the run failed: {_describe(exc)}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        print(json.dumps(result_doc(result), default=str), flush=True)
    else:
        if live:
            out.print()
        out.print(render_summary(result))
    return EXIT_OK if verdict(result).ok else EXIT_FAILED
