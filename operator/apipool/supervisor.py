"""The local supervisor behind ``apipool up``: N slot processes on this machine.

Rules, the same a kubelet and the operator follow for slot pods:

- a slot process that exits is started again (with a short back-off when it
  keeps crashing);
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import aiohttp
import redis

from . import defaults
from .errors import ConfigError
from .handlers import load_handlers
from .settings import ENV_OWNER, ENV_REDIS_URL, SlotSettings, Timings, check_pool_name
from .stats import write_pool_config

log = logging.getLogger("apipool.supervisor")


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
    max_envelope_bytes: int = defaults.MAX_ENVELOPE_BYTES
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
        load_handlers(settings.handlers)  # fail here, clearly, not in N crash loops

    # -- observation --------------------------------------------------------------

    def pids(self) -> dict[int, int]:
        return {s.index: pid for s in self.slots if (pid := s.pid) is not None}

    @property
    def restarts(self) -> int:
        return sum(max(0, s.starts - 1) for s in self.slots)

    def _event(self, slot: int, kind: str, detail: str = "") -> None:
        event = SlotEvent(time.monotonic(), slot, kind, detail)
        self.events.append(event)
        log.info("slot %d %s %s", slot, kind, detail)
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
            max_envelope_bytes=s.max_envelope_bytes,
            owner=self.owner,
            health_port=port,
            parent_pid=os.getpid(),
        )

    def _command(self, slot: SlotProcess) -> list[str]:
        argv = self.slot_settings(slot.index, slot.port).to_argv()
        return [sys.executable, "-m", "apipool", "--log-level", self.settings.log_level, *argv]

    def _log_file(self, slot: SlotProcess) -> IO[bytes] | None:
        if not self.settings.log_dir:
            return None  # inherit our stderr
        os.makedirs(self.settings.log_dir, exist_ok=True)
        return open(os.path.join(self.settings.log_dir, f"slot-{slot.index}.log"), "ab")

    async def _spawn(self, slot: SlotProcess) -> None:
        slot.port = free_port()
        env = dict(os.environ, **{ENV_OWNER: self.owner, ENV_REDIS_URL: self.settings.redis_url})
        out = self._log_file(slot)
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                *self._command(slot),
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

    async def _watch(self, slot: SlotProcess) -> None:
        """Return once the slot's process has exited or was killed and reaped."""
        s = self.settings
        assert slot.proc is not None
        proc = slot.proc
        exited = asyncio.ensure_future(proc.wait())
        last_ok = slot.started_at  # start of the last probe that succeeded
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=s.probe_interval)
                if done:
                    code = proc.returncode
                    detail = f"signal {-code}" if code is not None and code < 0 else f"code {code}"
                    self._event(slot.index, "exited", detail)
                    return
                probe_started = time.monotonic()
                if await self._probe(slot):
                    if not slot.healthy:
                        self._event(
                            slot.index, "healthy", f"after {probe_started - slot.started_at:.2f} s"
                        )
                    slot.healthy = True
                    last_ok = probe_started
                    continue
                # Unanswered since the last good probe: the liveness window
                # counts from there, as a kubelet's failure threshold does.
                silent = time.monotonic() - last_ok
                limit = s.liveness_window if slot.healthy else s.startup_timeout
                if silent < limit:
                    continue
                why = (
                    f"/healthz unanswered for {silent:.1f} s"
                    if slot.healthy
                    else f"not healthy {s.startup_timeout:g} s after start"
                )
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

    async def _keep(self, slot: SlotProcess) -> None:
        backoff = 0.0
        while not self.stopping.is_set():
            await self._spawn(slot)
            if self.stopping.is_set() and slot.proc is not None:
                slot.proc.send_signal(signal.SIGTERM)  # spawned while shutdown began
            await self._watch(slot)
            if self.stopping.is_set():
                break
            lived = slot.last_exit - slot.started_at
            # Restart at once; back off only a slot that keeps dying right after its start.
            backoff = (
                0.0 if lived > 5 else min(max(backoff * 2, 0.1), self.settings.restart_backoff_max)
            )
            if backoff:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), backoff)

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
