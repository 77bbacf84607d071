"""Ctrl-C and SIGTERM during a demo: stop the run, clean up, exit 128 + the signal.

Outside the event loop SIGTERM raises :class:`Interrupted`, like Ctrl-C raises
``KeyboardInterrupt``. Inside it, :func:`cancel_on_stop_signal` turns the first
of either into a cancellation of the running task, so the harness's ``finally``
stops the slots and the stand-in API before the interruption surfaces. A second
Ctrl-C is the plain ``KeyboardInterrupt`` again, for when the cleanup hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

from ..exitcodes import ExitCode

__all__ = [
    "Interrupted",
    "StopSignal",
    "cancel_on_stop_signal",
    "signal_exit_code",
    "sigterm_interrupts",
]


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (Ctrl-C or SIGTERM) and has cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_exit_code(signum: int) -> int:
    """128 + the signal's number: ``ExitCode.INTERRUPTED`` (130) for Ctrl-C, 143 for SIGTERM."""
    return ExitCode.INTERRUPTED if signum == signal.SIGINT else 128 + signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
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


class StopSignal:
    """The first stop signal seen during a run, and who to tell about it."""

    def __init__(self, on_stop: Callable[[], None] | None = None) -> None:
        self.signum: int | None = None
        self.on_stop = on_stop


@contextlib.contextmanager
def cancel_on_stop_signal(stop: StopSignal) -> Iterator[None]:
    """In a coroutine: the first Ctrl-C or SIGTERM is recorded in ``stop`` and cancels it."""
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
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        if signal.SIGTERM in installed and outer_sigterm is not None:
            signal.signal(signal.SIGTERM, outer_sigterm)  # remove_signal_handler set SIG_DFL
