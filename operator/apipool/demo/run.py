"""Running the demo: a reachable Redis, the scenario, a live view or plain lines, the exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from rich.console import Console
from rich.live import Live

from ..errors import ApipoolError
from ..exitcodes import ExitCode
from ..testing.harness import Scenario, ScenarioResult, Snapshot, run_scenario
from ..testing.redis_server import RedisServer
from .figures import RateMeter, progress_line
from .scenario import build_scenario
from .signals import (
    Interrupted,
    StopSignal,
    cancel_on_stop_signal,
    signal_exit_code,
    sigterm_interrupts,
)
from .summary import render_summary, result_doc, verdict
from .view import PANEL_WIDTH, LiveView, logs_above

__all__ = ["DemoError", "run_demo"]

TICK = 0.25
"""Seconds between snapshots from the harness; the live view refreshes at the same pace."""
REFRESH_PER_SECOND = 4
PROGRESS_EVERY = 5.0
"""Seconds between progress lines on stderr when there is no live view."""


class DemoError(Exception):
    """The demo could not run; the message says why, ``code`` is the exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.CHECK_FAILED) -> None:
        super().__init__(message)
        self.code = code


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
        raise DemoError(f"bad --redis-url {_redact(url)!r}: {exc}", ExitCode.USAGE) from None
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


async def _measure(
    scenario: Scenario, on_tick: Callable[[Snapshot], None], stop: StopSignal
) -> ScenarioResult:
    with cancel_on_stop_signal(stop):
        return await run_scenario(scenario, on_tick=on_tick, tick=TICK)


def _run(
    scenario: Scenario,
    on_tick: Callable[[Snapshot], None],
    on_stop: Callable[[], None] | None = None,
    on_redis: Callable[[str], None] | None = None,
) -> ScenarioResult:
    """Run the scenario to its end; :class:`Interrupted` if a signal stopped it.
    ``on_redis`` is given the run's Redis URL before the pool starts."""
    stop = StopSignal(on_stop)
    try:
        with _with_redis(scenario) as ready:
            if on_redis is not None and ready.redis_url:
                on_redis(ready.redis_url)
            return asyncio.run(_measure(ready, on_tick, stop))
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT) from None
    except BaseException as exc:  # CancelledError, or whatever the cleanup raised after a signal
        if stop.signum is not None:
            raise Interrupted(stop.signum) from exc
        raise


def _run_live(scenario: Scenario, console: Console) -> ScenarioResult:
    view = LiveView(scenario)
    with (
        Live(view, console=console, refresh_per_second=REFRESH_PER_SECOND) as live,
        logs_above(live.console, view),
    ):
        try:
            result = _run(scenario, view.update, on_stop=view.stopping, on_redis=view.watch)
        except Interrupted:
            view.phase = "interrupted"
            raise
        except BaseException:
            view.phase = "failed"
            raise
        finally:
            view.close()
        view.phase = "done"
    return result


def _run_recorded(scenario: Scenario) -> tuple[ScenarioResult, LiveView]:
    """Run with the live view's state but no live display (``--svg``): the view
    is rendered once, at the end, into the picture."""
    view = LiveView(scenario)
    progress = _ProgressLines(sys.stderr)

    def tick(snap: Snapshot) -> None:
        view.update(snap)
        progress(snap)

    _say(f"{scenario.slots} slots, {scenario.duration:g} s; the view goes to an SVG at the end")
    try:
        result = _run(scenario, tick, on_stop=view.stopping, on_redis=view.watch)
    finally:
        view.close()
    view.phase = "done"
    return result, view


def save_svg(path: str, view: LiveView, result: ScenarioResult) -> None:
    """The demo's final view and its summary as an SVG picture at ``path``."""
    console = Console(record=True, width=PANEL_WIDTH + 4, file=io.StringIO(), highlight=False)
    console.print(view)
    console.print(render_summary(result))
    console.save_svg(path, title="apipool demo")


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


def _say(message: str) -> None:
    print(f"apipool demo: {message}", file=sys.stderr, flush=True)


def _run_plain(scenario: Scenario) -> ScenarioResult:
    _say(
        f"{scenario.slots} slots against a stand-in API limited to "
        f"{scenario.api_limit or scenario.slots}, {scenario.duration:g} s"
        f"{', chaos' if scenario.chaos else ''}; starting"
    )
    return _run(scenario, _ProgressLines(sys.stderr), on_stop=lambda: _say("stopping…"))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _run_until_done(scenario: Scenario, out: Console, live: bool) -> ScenarioResult | int:
    """The run's result, or the exit code when it did not finish (the reason is on stderr)."""
    try:
        with sigterm_interrupts():
            return _run_live(scenario, out) if live else _run_plain(scenario)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        what = "interrupted" if signum == signal.SIGINT else "terminated"
        _say(f"{what}; everything it started is stopped")
        return signal_exit_code(signum)
    except DemoError as exc:
        _say(f"error: {exc}")
        return exc.code
    except ApipoolError as exc:
        _say(f"error: {exc}")
        return ExitCode.CHECK_FAILED
    except Exception as exc:
        _say(f"the run failed: {_describe(exc)}")
        return ExitCode.CHECK_FAILED


def run_demo(args: argparse.Namespace) -> int:
    """The ``demo`` subcommand; returns the exit code (:class:`~apipool.exitcodes.ExitCode`).

    ``OK`` (0): the cap held and nothing was lost; ``CHECK_FAILED`` (7): it did
    not, or the run failed; ``USAGE`` (2): bad arguments; 130 (143): stopped by
    Ctrl-C (SIGTERM), after cleaning up.
    """
    as_json = bool(args.json)
    live = not as_json and sys.stdout.isatty()
    try:
        scenario = build_scenario(args)
    except ValueError as exc:
        _say(f"error: {exc}")
        return ExitCode.USAGE
    out = Console(highlight=False)
    if getattr(args, "svg", None):
        try:
            with sigterm_interrupts():
                recorded, view = _run_recorded(scenario)
        except KeyboardInterrupt:
            return signal_exit_code(signal.SIGINT)
        save_svg(str(args.svg), view, recorded)
        _say(f"the view is in {args.svg}")
        out.print(render_summary(recorded))
        return verdict(recorded).exit_code
    result = _run_until_done(scenario, out, live)
    if isinstance(result, int):
        return result
    if as_json:
        print(json.dumps(result_doc(result), default=str), flush=True)
    else:
        if live:
            out.print()
        out.print(render_summary(result))
    return verdict(result).exit_code
