"""The local supervisor behind ``apipool up``: N slot processes on this machine.

Rules, the same a kubelet and the operator follow for slot pods:

- a slot process that exits is started again (with a short back-off when it
  keeps crashing); an exit that was not asked for is logged as a WARNING with
  its exit code or signal (e.g. a handler that called ``os._exit``);
- a slot whose ``/healthz`` has failed for ``liveness_window`` seconds (or that
  never became healthy within ``startup_timeout``) is SIGKILLed and **reaped
  before** its replacement starts, so two processes never share a slot;
- SIGTERM / Ctrl-C stops every slot gracefully (SIGTERM, then SIGKILL after the
  shutdown grace).

Slots run in their own sessions (terminal signals reach only the supervisor)
and stop by themselves when the supervisor disappears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO

import aiohttp
import redis

from . import defaults
from .errors import ConfigError
from .handlers import load_handlers
from .settings import (
    ENV_OWNER,
    ENV_REDIS_URL,
    HttpPolicy,
    Limits,
    SlotSettings,
    Timings,
    check_pool_name,
)
from .stats import write_pool_config
from .waiting import wait_event

log = logging.getLogger("apipool.supervisor")


CRASH_LOOP_LIFETIME = 5.0
"""A slot that exits sooner than this after its start is restarted after a back-off."""
FIRST_BACKOFF = 0.1
"""Seconds of the first back-off of a crash loop; it doubles at each further crash."""


def restart_backoff(previous: float, lived: float, maximum: float) -> float:
    """Seconds to wait before starting a slot again that ran ``lived`` seconds:
    none after a long enough life, else double the ``previous`` back-off
    (at least FIRST_BACKOFF), never more than ``maximum``."""
    if lived > CRASH_LOOP_LIFETIME:
        return 0.0
    return min(max(previous * 2, FIRST_BACKOFF), maximum)


def exit_detail(returncode: int | None) -> str:
    """How a process ended, for the ``exited`` event: ``code N`` or ``signal N``."""
    if returncode is not None and returncode < 0:
        return f"signal {-returncode}"
    return f"code {returncode}"


def slot_environment(
    owner: str, redis_url: str, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A slot process's environment: ``base`` (default: ours) plus its owner and
    Redis URL, which stay off its command line (visible to every local user)."""
    env = dict(os.environ if base is None else base)
    env[ENV_OWNER] = owner
    env[ENV_REDIS_URL] = redis_url
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (a slot's health port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class SupervisorSettings:
    """What ``apipool up`` runs. Times in seconds."""

    redis_url: str
    pool: str
    slots: int
    handlers: tuple[str, ...] = (defaults.HANDLER,)
    timings: Timings = field(default_factory=Timings)
    max_attempts: int = defaults.MAX_ATTEMPTS
    result_ttl: float = defaults.RESULT_TTL
    limits: Limits = field(default_factory=Limits)
    http: HttpPolicy = field(default_factory=HttpPolicy)
    allow_eviction: bool = False
    max_queue_length: int = defaults.MAX_QUEUE_LENGTH
    """Producers get QueueFull past this many queued jobs; 0: unbounded."""
    liveness_window: float = defaults.LIVENESS_WINDOW
    """A slot failing /healthz this long is killed and replaced."""
    probe_interval: float = 0.5
    probe_timeout: float = 0.5
    startup_timeout: float = 15.0
    """A slot not healthy this long after its start is killed and replaced."""
    restart_backoff_max: float = 5.0
    log_dir: str | None = None
    """Write each slot's log to <log_dir>/slot-<i>.log instead of inheriting stderr."""
    log_level: str = "INFO"
    standby: bool = defaults.STANDBY
    """Run each slot under a keeper with a warm standby (keeper.py)."""
    prefetch: bool = defaults.PREFETCH
    """Slots take their next job during a call while the queue is long."""
    adaptive: bool = defaults.ADAPTIVE
    """Slots use fewer than N of themselves while the API keeps answering 429."""
    max_pause: float = defaults.MAX_PAUSE
    """The longest pool-wide pause a Retry-After can ask for."""

    def __post_init__(self) -> None:
        check_pool_name(self.pool)
        if self.slots < 0:
            raise ConfigError(f"slots must be >= 0, got {self.slots}")
        if self.liveness_window <= 0 or self.probe_interval <= 0 or self.probe_timeout <= 0:
            raise ConfigError("liveness_window, probe_interval and probe_timeout must be > 0")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.max_queue_length < 0:
            raise ConfigError("max_queue_length must be >= 0")


@dataclass
class SlotEvent:
    at: float  # time.monotonic()
    slot: int
    kind: str  # started, healthy, exited, killed, stopped
    detail: str = ""


@dataclass
class SlotProcess:
    index: int
    proc: asyncio.subprocess.Process | None = None
    port: int = 0
    started_at: float = 0.0
    healthy: bool = False
    starts: int = 0
    last_exit: float = 0.0

    @property
    def pid(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None
        return self.proc.pid


class Supervisor:
    def __init__(
        self,
        settings: SupervisorSettings,
        *,
        on_event: Callable[[SlotEvent], None] | None = None,
    ) -> None:
        self.settings = settings
        self.owner = f"sup-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.slots = [SlotProcess(i) for i in range(settings.slots)]
        self.events: list[SlotEvent] = []
        self.stopping = asyncio.Event()
        self._on_event = on_event
        self._http: aiohttp.ClientSession | None = None
        # fail here, clearly, not in N crash loops
        load_handlers(settings.handlers, http=settings.http, limits=settings.limits)

    # -- observation --------------------------------------------------------------

    def pids(self) -> dict[int, int]:
        return {s.index: pid for s in self.slots if (pid := s.pid) is not None}

    @property
    def restarts(self) -> int:
        return sum(max(0, s.starts - 1) for s in self.slots)

    def _event(self, slot: int, kind: str, detail: str = "", *, level: int = logging.INFO) -> None:
        event = SlotEvent(time.monotonic(), slot, kind, detail)
        self.events.append(event)
        if kind == "exited":
            log.log(level, "slot %d exited with %s", slot, detail)
        else:
            log.log(level, "slot %d %s %s", slot, kind, detail)
        if self._on_event is not None:
            self._on_event(event)

    # -- process control ----------------------------------------------------------

    def slot_settings(self, index: int, port: int) -> SlotSettings:
        """What slot ``index`` runs with; its Redis URL travels in the environment."""
        s = self.settings
        return SlotSettings(
            pool=s.pool,
            slot=index,
            handlers=s.handlers,
            timings=s.timings,
            max_attempts=s.max_attempts,
            result_ttl=s.result_ttl,
            limits=s.limits,
            http=s.http,
            allow_eviction=s.allow_eviction,
            owner=self.owner,
            health_port=port,
            parent_pid=os.getpid(),
            standby=s.standby,
            prefetch=s.prefetch,
            adaptive=s.adaptive,
            max_pause=s.max_pause,
        )

    def command(self, index: int, port: int) -> list[str]:
        """The command line of slot ``index``: ``SlotSettings.to_argv`` (no Redis URL)."""
        argv = self.slot_settings(index, port).to_argv()
        return [sys.executable, "-m", "apipool", "--log-level", self.settings.log_level, *argv]

    def _log_file(self, slot: SlotProcess) -> IO[bytes] | None:
        if not self.settings.log_dir:
            return None  # inherit our stderr
        os.makedirs(self.settings.log_dir, exist_ok=True)
        return open(os.path.join(self.settings.log_dir, f"slot-{slot.index}.log"), "ab")

    async def _spawn(self, slot: SlotProcess) -> None:
        slot.port = free_port()
        env = slot_environment(self.owner, self.settings.redis_url)
        out = self._log_file(slot)
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                *self.command(slot.index, slot.port),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()
        slot.started_at = time.monotonic()
        slot.healthy = False
        slot.starts += 1
        self._event(slot.index, "started", f"pid {slot.proc.pid}")

    async def _probe(self, slot: SlotProcess) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(
                f"http://127.0.0.1:{slot.port}/healthz",
                timeout=aiohttp.ClientTimeout(total=self.settings.probe_timeout),
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def _kill_reason(self, slot: SlotProcess, last_ok: float) -> str | None:
        """Why the slot must be killed now that a probe failed; None: not yet. The
        liveness window counts from the start of the last good probe, as a
        kubelet's failure threshold does; before a first one, the startup timeout."""
        s = self.settings
        silent = time.monotonic() - last_ok
        if slot.healthy and silent >= s.liveness_window:
            return f"/healthz unanswered for {silent:.1f} s"
        if not slot.healthy and silent >= s.startup_timeout:
            return f"not healthy {s.startup_timeout:g} s after start"
        return None

    async def _watch(self, slot: SlotProcess) -> None:
        """Return once the slot's process has exited or was killed and reaped."""
        assert slot.proc is not None
        proc = slot.proc
        exited = asyncio.ensure_future(proc.wait())
        last_ok = slot.started_at  # start of the last probe that succeeded
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=self.settings.probe_interval)
                if done:
                    self._exited(slot.index, proc.returncode)
                    return
                probe_started = time.monotonic()
                if await self._probe(slot):
                    if not slot.healthy:
                        after = probe_started - slot.started_at
                        self._event(slot.index, "healthy", f"after {after:.2f} s")
                    slot.healthy = True
                    last_ok = probe_started
                    continue
                why = self._kill_reason(slot, last_ok)
                if why is None:
                    continue
                slot.healthy = False
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await exited  # reaped: only now may a replacement start
                self._event(slot.index, "killed", why)
                return
        finally:
            slot.healthy = False
            slot.last_exit = time.monotonic()
            if not exited.done():
                exited.cancel()

    def _exited(self, index: int, returncode: int | None) -> None:
        """Record an exit: a WARNING unless it was a clean exit or asked for by a stop."""
        asked = returncode == 0 or self.stopping.is_set()
        level = logging.INFO if asked else logging.WARNING
        self._event(index, "exited", exit_detail(returncode), level=level)

    async def _keep(self, slot: SlotProcess) -> None:
        backoff = 0.0
        while not self.stopping.is_set():
            await self._spawn(slot)
            if self.stopping.is_set() and slot.proc is not None:
                slot.proc.send_signal(signal.SIGTERM)  # spawned while shutdown began
            await self._watch(slot)
            if self.stopping.is_set():
                break
            # Restart at once; back off only a slot that keeps dying right after its start.
            lived = slot.last_exit - slot.started_at
            backoff = restart_backoff(backoff, lived, self.settings.restart_backoff_max)
            if backoff:
                await wait_event(self.stopping, backoff)

    async def _shutdown(self) -> None:
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        grace = self.settings.timings.shutdown_grace + 1.0
        waits = [asyncio.ensure_future(p.wait()) for p in live]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            for proc in live:
                if proc.returncode is None:
                    log.warning("slot pid %d did not stop in %.0f s; killing", proc.pid, grace)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending)
        for s in self.slots:
            self._event(s.index, "stopped")

    def stop(self) -> None:
        self.stopping.set()

    async def run(self, *, install_signals: bool = True) -> int:
        s = self.settings
        with redis.Redis.from_url(s.redis_url, socket_timeout=5) as r:
            write_pool_config(r, s.pool, slots=s.slots, max_queue_length=s.max_queue_length)
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        self._http = aiohttp.ClientSession()
        keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
        try:
            await self.stopping.wait()
        finally:
            self.stopping.set()
            await self._shutdown()
            await asyncio.gather(*keepers, return_exceptions=True)
            await self._http.close()
        return 0
