"""``apipool report``: one screen on where the pool's paid capacity went (needs ``rich``).

Reads nothing itself: :func:`render` draws a :class:`~apipool.ledger.SlotSeconds`
(the share of paid capacity used for calling, then each cause of loss in
seconds and as a share of capacity, largest first).
"""

from __future__ import annotations

import datetime as dt

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .ledger import SlotSeconds

BAR_WIDTH = 30


def _when(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _bar(share: float) -> str:
    filled = round(max(0.0, min(1.0, share)) * BAR_WIDTH)
    return "█" * filled + "·" * (BAR_WIDTH - filled)


def render(seconds: SlotSeconds) -> RenderableType:
    """The report of one pool, as one renderable."""
    title = Text(f"pool {seconds.pool}", style="bold")
    if seconds.capacity <= 0:
        return Group(title, Text("no slot-seconds recorded in this range"))
    span = (
        f"{_when(seconds.since)} .. {_when(seconds.until)}"
        f" ({seconds.until - seconds.since:.0f} s), N = {seconds.slots},"
        f" paid capacity {seconds.capacity:.0f} slot-seconds"
    )
    used = seconds.utilization or 0.0
    headline = Text.assemble(
        ("capacity used for calling: ", "bold"),
        (f"{used:.1%}", "bold green" if used >= 0.9 else "bold yellow"),
        f"  ({seconds.states.get('calling', 0.0):.0f} s)",
    )
    table = Table(title="lost capacity by cause", title_justify="left")
    table.add_column("cause")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    table.add_column("")
    for cause, lost in sorted(seconds.losses.items(), key=lambda item: -item[1]):
        share = lost / seconds.capacity
        table.add_row(cause.replace("_", " "), f"{lost:.1f}", f"{share:.1%}", _bar(share))
    largest = seconds.largest_loss
    footer = Text(
        "nothing lost"
        if largest is None
        else f"largest loss: {largest[0].replace('_', ' ')} ({largest[1]:.1%} of capacity)"
    )
    return Group(title, Text(span), headline, table, footer)


def print_report(seconds: SlotSeconds, console: Console | None = None) -> None:
    """Print :func:`render` to ``console`` (stdout by default)."""
    (console or Console()).print(render(seconds))
