"""Single figures as styled text: the palette, the concurrency bar, rates, progress lines.

Shared by the live panel (:mod:`.view`), the summary (:mod:`.summary`) and the
plain progress lines printed when there is no terminal to draw on.
"""

from __future__ import annotations

from collections import deque

from rich.text import Text

from ..testing.harness import Snapshot

__all__ = [
    "BAD",
    "BAR_WIDTH",
    "DIM",
    "GOOD",
    "RATE_WINDOW",
    "WARN",
    "RateMeter",
    "concurrency_bar",
    "connections_text",
    "over_limit_text",
    "peak_text",
    "percent",
    "progress_line",
    "utilization_style",
]

GOOD, WARN, BAD, DIM = "green", "yellow", "bold red", "grey50"

BAR_WIDTH = 32
RATE_WINDOW = 2.0
"""Seconds of history behind the throughput shown live (one tick alone is too jumpy)."""


def percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f} %"


def utilization_style(fraction: float) -> str:
    return GOOD if fraction >= 0.9 else WARN if fraction >= 0.75 else BAD


def over_limit_text(seconds: float) -> Text:
    """``0.00 s`` in green when the limit was never exceeded, red otherwise."""
    return Text(f"{seconds:.2f} s", style=GOOD if seconds == 0 else BAD)


def peak_text(peak: int, limit: int) -> Text:
    return Text(f"{peak}/{limit}", style=GOOD if peak <= limit else BAD)


def _segmented_bar(active: int, limit: int, width: int, style: str) -> tuple[Text, str]:
    """One segment per slot; returns the bar and the cells drawn past the limit mark."""
    seg = max(1, (width - (limit - 1)) // limit)
    bar = Text()
    for i in range(limit):
        if i:
            bar.append(" ")
        filled = i < active
        bar.append(("█" if filled else "░") * seg, style=style if filled else DIM)
    over = max(active - limit, 0)
    return bar, " ".join(["█" * seg] * min(over, 3))


def _scaled_bar(active: int, limit: int, width: int, style: str) -> tuple[Text, str]:
    """A continuous bar of ``width`` cells; returns it and the cells past the limit mark."""
    filled = min(width, round(active * width / limit))
    if active and not filled:
        filled = 1  # one connection open is never drawn as none
    bar = Text()
    bar.append("█" * filled, style=style)
    bar.append("░" * (width - filled), style=DIM)
    over = max(active - limit, 0)
    return bar, "█" * min(width // 4, max(1, round(over * width / limit))) if over else ""


def concurrency_bar(active: int, limit: int, width: int = BAR_WIDTH) -> Text:
    """Calls (or connections) at the stand-in API against its limit, e.g. ``██ ██ ░░ 2/3``.

    Small limits get one segment per slot; larger ones a continuous bar scaled to
    ``width`` cells. Connections over the limit are drawn in red after a ``┃`` mark.
    """
    active, limit = max(active, 0), max(limit, 1)
    over = active > limit
    style = BAD if over else GOOD if active == limit else WARN
    draw = _segmented_bar if limit <= width // 3 else _scaled_bar
    bar, extra = draw(active, limit, width, style)
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
