"""A slot's keeper: a small parent process with a warm standby, for failover in
well under a second.

``apipool slot --standby`` runs this instead of the slot worker itself. The
keeper imports everything a worker needs (the slot's modules and the pool's
handlers), binds the slot's health port, and then forks two children:

- the **active** worker: the slot as ``apipool slot`` runs it, serving on the
  keeper's listening socket, whose event loop writes a byte to a pipe every
  :data:`~apipool.slot.BEAT_INTERVAL` seconds;
- a **warm standby**: a fork of the same imported process, blocked on a pipe
  read. It opens no connection and calls nothing until the keeper writes ``g``.

The keeper learns of the active child's death at once (it is its parent) and of
a hang when no byte has come for ``hang_window`` seconds of counted silence
(silence.py: time the keeper itself did not run and time the runnable worker
waited for a CPU do not count, so a busy or throttled node does not look like
a hang).
A hung child is SIGKILLed and **reaped** (its connections die with it) before
anything else happens; then the standby is promoted: it takes the slot's lease over as the
same owner (at once) and recovers the job the dead child left in flight, as any
successor does. A new standby is forked from the keeper (already imported:
milliseconds). So at most one process of a slot ever calls the API.

The keeper itself runs no event loop, no handler code and no Redis client: a
loop around ``select`` and ``waitpid``, so that the kubelet's liveness probe
(or the local supervisor) watches a process that does not hang. Its children
die with it (``PR_SET_PDEATHSIG``; elsewhere they notice their parent gone at
their next heartbeat). A child that exits by itself with code 0 (told to stop)
or 2 (bad configuration) ends the keeper with that code, and so do three deaths
within :data:`QUICK_DEATH` seconds of a start, so that the kubelet's or the
supervisor's back-off applies. SIGTERM: the active child stops gracefully (its
call finished, its lease released), the standby is killed, the keeper exits
with the active child's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from types import FrameType

from .exitcodes import ExitCode
from .handlers import Handler, load_handlers
from .health import listening_socket
from .settings import SlotSettings
from .silence import SilenceClock, sample
from .slot import SlotWorker

log = logging.getLogger("apipool.keeper")

TICK = 0.05
"""Longest wait of the keeper's loop."""
QUICK_DEATH = 2.0
"""A child that dies sooner than this after its start counts towards a crash loop."""
MAX_QUICK_DEATHS = 3
STARTUP_ALLOWANCE = 10.0
"""Seconds a new active child may take to send its first beat."""
REAP_TIMEOUT = 10.0
STANDBY_DELAY = 0.1
"""Seconds after a promotion before the next standby is forked: the promoted
worker gets the machine first (a fault meanwhile forks one at once)."""
PR_SET_PDEATHSIG = 1


@dataclasses.dataclass
class Child:
    pid: int
    beat_r: int
    """Read end of the pipe the child's event loop writes to."""
    go_w: int | None
    """Write end of the standby's go pipe (None once promoted)."""
    started: float
    last_beat: float
    clock: SilenceClock
    beaten: bool = False


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _exit_code(status: int) -> int:
    """A wait status as an exit code: a death by signal N is 128 + N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class Keeper:
    """Keeps one active slot worker and one warm standby (see the module doc)."""

    def __init__(self, settings: SlotSettings, handlers: dict[str, Handler] | None = None):
        self.settings = settings
        self.window = settings.timings.hang_window
        self.handlers = handlers or load_handlers(
            settings.handlers, http=settings.http, limits=settings.limits
        )
        self.pid = os.getpid()
        self.sock: socket.socket = listening_socket(settings.health_host, settings.health_port)
        self.active: Child | None = None
        self.standby: Child | None = None
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = int(ExitCode.OK)
        self.quick_deaths = 0
        self.promotions = 0
        self.hangs = 0
        self._stop_asked = False
        self._standby_due: float | None = None
        self._last_look = time.monotonic()
        self._sig_r, self._sig_w = os.pipe()
        os.set_blocking(self._sig_r, False)
        os.set_blocking(self._sig_w, False)

    # -- children --------------------------------------------------------------------

    def _fork(self, *, standby: bool) -> Child:
        beat_r, beat_w = os.pipe()
        go_r, go_w = os.pipe() if standby else (None, None)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                _close(beat_r, go_w)
                code = self._child(beat_w, go_r)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        _close(beat_w, go_r)
        os.set_blocking(beat_r, False)
        now = time.monotonic()
        return Child(pid, beat_r, go_w, now, now, SilenceClock(self.window))

    def _child(self, beat_w: int, go_r: int | None) -> int:
        _die_with_parent()
        if os.getppid() != self.pid:
            return 1  # the keeper died before the prctl took effect
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        kept = {beat_w, go_r, self.sock.fileno()}
        for other in (self.active, self.standby):
            if other is not None:
                _close(*(fd for fd in (other.beat_r, other.go_w) if fd not in kept))
        _close(self._sig_r, self._sig_w)
        settings = dataclasses.replace(self.settings, parent_pid=self.pid)
        worker = SlotWorker(settings, self.handlers)
        worker.health_socket = self.sock
        worker.beat_fd = beat_w
        os.set_blocking(beat_w, False)
        return asyncio.run(self._serve(worker, go_r))

    @staticmethod
    async def _serve(worker: SlotWorker, go_r: int | None) -> int:
        """The worker's life in a child; a standby first opens its Redis
        connections and waits for the keeper's ``g`` (anything else: it exits)."""
        if go_r is not None:
            await worker.prepare()
            loop = asyncio.get_running_loop()
            ready: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(go_r, wake)
            await ready
            loop.remove_reader(go_r)
            try:
                word = os.read(go_r, 1)
            except OSError:
                word = b""
            _close(go_r)
            if word != b"g":
                return int(ExitCode.OK)  # the keeper is gone or let this standby go
        return await worker.run()

    def _promote(self, why: str) -> None:
        """The standby becomes the active child; a new standby is forked."""
        standby = self.standby or self._fork(standby=True)
        assert standby.go_w is not None
        os.write(standby.go_w, b"g")
        _close(standby.go_w)
        standby.go_w = None
        now = time.monotonic()
        standby.started = standby.last_beat = now
        standby.clock.heard(sample(standby.pid))
        self.active = standby
        self.promotions += 1
        log.warning("slot %d: %s; standby %d promoted", self.settings.slot, why, standby.pid)
        self.standby = None
        self._standby_due = now + STANDBY_DELAY  # the promoted one starts first

    # -- events ----------------------------------------------------------------------

    def _on_exit(self, pid: int, code: int) -> None:
        active, standby = self.active, self.standby
        if standby is not None and pid == standby.pid:
            _close(standby.beat_r, standby.go_w)
            self.standby = None
            if not self.stopping:
                log.warning("slot %d: standby %d died (%d); forking another",
                            self.settings.slot, pid, code)  # fmt: skip
                self.standby = self._fork(standby=True)
            return
        if active is None or pid != active.pid:
            return
        _close(active.beat_r)
        self.active = None
        if self.stopping:
            self.exit_code = code
            return
        if code in (ExitCode.OK, ExitCode.USAGE):
            self._begin_stop(code)  # told to stop (or cannot start): so is the keeper
            return
        quick = time.monotonic() - active.started < QUICK_DEATH
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            log.error("slot %d: the worker keeps dying at start (%d); giving up",
                      self.settings.slot, code)  # fmt: skip
            self._begin_stop(code)
            return
        self._promote(f"worker {pid} exited with {code}")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._on_exit(pid, _exit_code(status))

    def _kill_hung(self, active: Child) -> None:
        """SIGKILL a hung active child and reap it: only then is its connection gone."""
        self.hangs += 1
        silent = time.monotonic() - active.last_beat
        counted = active.clock.silent
        log.warning("slot %d: worker %d silent for %.2f s (%.2f s counted); killing it",
                    self.settings.slot, active.pid, silent, counted)  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            os.kill(active.pid, signal.SIGKILL)
        deadline = time.monotonic() + REAP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(active.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self._on_exit(pid, _exit_code(status))
                return
            time.sleep(0.002)
        raise RuntimeError(f"worker {active.pid} could not be reaped after SIGKILL")

    def _begin_stop(self, code: int | None = None) -> None:
        if self.stopping:
            return
        self.stopping = True
        if code is not None:
            self.exit_code = code
        self.stop_deadline = time.monotonic() + self.settings.timings.shutdown_grace + 5.0
        if self.standby is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.standby.pid, signal.SIGKILL)
        if self.active is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.active.pid, signal.SIGTERM)

    def _ask_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_asked = True

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        """SIGUSR1 (print every task's stack) is for the worker: pass it on."""
        if self.active is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.active.pid, signum)

    def _drain(self, fd: int) -> bool:
        """Read what a pipe holds; False at end of file (the writer is gone)."""
        try:
            while True:
                data = os.read(fd, 4096)
                if not data:
                    return False
                if len(data) < 4096:
                    return True
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _tick(self) -> None:
        active = self.active
        fds = [self._sig_r] + ([active.beat_r] if active is not None else [])
        ready, _, _ = select.select(fds, [], [], TICK)
        if self._sig_r in ready:
            self._drain(self._sig_r)
        now = time.monotonic()
        elapsed, self._last_look = now - self._last_look, now
        if active is not None:
            if active.beat_r in ready and self._drain(active.beat_r):
                active.last_beat = now
                active.beaten = True
                active.clock.heard(sample(active.pid))
            else:
                active.clock.look(elapsed, sample(active.pid))
        self._reap()
        parent = self.settings.parent_pid
        if self._stop_asked or (parent is not None and os.getppid() != parent):
            self._begin_stop()
        active = self.active
        now = time.monotonic()
        if self.stopping:
            if active is not None and now > self.stop_deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(active.pid, signal.SIGKILL)
            return
        if self.standby is None and self._standby_due is not None and now >= self._standby_due:
            self._standby_due = None
            self.standby = self._fork(standby=True)
        if active is None:
            return
        # Silence counted since the last beat; before the first, a start's allowance.
        if active.clock.hung if active.beaten else now - active.last_beat > STARTUP_ALLOWANCE:
            self._kill_hung(active)

    # -- the loop ----------------------------------------------------------------------

    def _done(self) -> bool:
        return self.stopping and self.active is None

    def run(self) -> int:
        signal.set_wakeup_fd(self._sig_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._ask_stop)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the select
        signal.signal(signal.SIGUSR1, self._forward)
        log.info("slot %d of pool %r: keeper %d, hang window %.2f s",
                 self.settings.slot, self.settings.pool, self.pid, self.window)  # fmt: skip
        # Everything imported so far goes to the collector's permanent generation:
        # the children's collections then leave those shared pages alone.
        gc.freeze()
        self.active = self._fork(standby=False)
        self.standby = self._fork(standby=True)
        try:
            while not self._done():
                self._tick()
        finally:
            for child in (self.active, self.standby):
                if child is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, 0)[0]:
                    pass
            signal.set_wakeup_fd(-1)
            self.sock.close()
        return self.exit_code


def run_keeper(settings: SlotSettings) -> int:
    """Run a slot under a keeper until it stops; returns the exit code."""
    return Keeper(settings).run()
