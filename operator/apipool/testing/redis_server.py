"""A throwaway real ``redis-server`` for the demo, the tests and the benchmarks.

It listens on 127.0.0.1 only, on a free port, with no RDB snapshots, and keeps
its files (log, AOF) in a temporary directory of its own::

    with RedisServer(appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        ...
        server.restart()  # same port; data kept because of appendonly
        server.pause()  # SIGSTOP: connections hang, like a network outage
        server.resume()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..supervisor import free_port
from .polling import WaitTimeout, wait_for

__all__ = [
    "RedisServer",
    "RedisServerError",
    "RedisServerFailed",
    "RedisServerMissing",
    "free_port",
]

START_DEADLINE = 10.0
"""Seconds :meth:`RedisServer.start` waits for the first answer to PING."""

STOP_DEADLINE = 10.0
"""Seconds :meth:`RedisServer.stop` waits after SIGTERM before it sends SIGKILL."""


class RedisServerError(Exception):
    """A throwaway redis-server could not be had (a test tool's error, not apipool's)."""


class RedisServerMissing(RedisServerError):
    """The ``redis-server`` executable was not found."""

    def __init__(self, binary: str) -> None:
        super().__init__(
            f"redis-server was not found on PATH (looked for {binary!r}); install the package "
            "redis-server (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)"
        )
        self.binary = binary


class RedisServerFailed(RedisServerError):
    """``redis-server`` did not come up; the message ends with its log tail."""


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class RedisServer:
    """A ``redis-server`` child process bound to 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        workdir: str | None = None,
        binary: str = "redis-server",
        bind: tuple[str, ...] = ("127.0.0.1",),
    ) -> None:
        self._port = port if port is not None else free_port()
        self.bind = bind
        """Addresses it listens on (127.0.0.1 first, always; others for pods in
        network namespaces of their own)."""
        self.appendonly = appendonly
        self.binary = binary
        self._workdir = Path(workdir) if workdir is not None else None
        self._own_workdir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._paused = False

    @property
    def port(self) -> int:
        """The port, fixed for the object's lifetime (kept across restarts)."""
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return self.url_at("127.0.0.1")

    def url_at(self, host: str) -> str:
        """The URL through one of the addresses it listens on."""
        return f"redis://{host}:{self._port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive (a paused one is still running)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while running, else ``None``."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def workdir(self) -> Path | None:
        """The directory holding the log and the AOF (created by the first start)."""
        return self._workdir

    def _command(self, executable: str, workdir: Path) -> list[str]:
        cmd = [
            executable,
            "--bind", *dict.fromkeys(("127.0.0.1", *self.bind)),
            "--port", str(self._port),
            "--protected-mode", "no",
            "--daemonize", "no",
            "--save", "",
            "--dir", str(workdir),
            "--logfile", str(workdir / "redis.log"),
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.appendonly:
            cmd += ["--appendfsync", "always"]
        return cmd

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            raise RuntimeError(f"redis-server is already running on port {self._port}")
        executable = shutil.which(self.binary)
        if executable is None:
            raise RedisServerMissing(self.binary)
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="apipool-redis-"))
            self._own_workdir = True
        self._workdir.mkdir(parents=True, exist_ok=True)
        workdir = self._workdir
        self._close_output()
        self._output = (workdir / "redis.out").open("ab")
        self._paused = False
        self._proc = subprocess.Popen(
            self._command(executable, workdir),
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        errors: list[Exception] = []
        try:
            wait_for(lambda: self._answers_ping(errors), START_DEADLINE, what="redis-server PING")
        except WaitTimeout:
            why = f"redis-server did not answer PING within {START_DEADLINE:g} s"
            if errors:
                why += f" (last error: {errors[0]})"
            raise RedisServerFailed(self._failure(why)) from None

    def _answers_ping(self, errors: list[Exception]) -> bool:
        """One PING; its error, if any, replaces ``errors``. Raise if the process has exited."""
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise RedisServerFailed(self._failure(f"redis-server exited with status {code}"))
        client = redis.Redis(
            host="127.0.0.1",
            port=self._port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        except redis.RedisError as exc:  # refused, or still loading the AOF
            errors[:] = [exc]
            return False
        finally:
            client.close()

    def _failure(self, why: str) -> str:
        assert self._workdir is not None
        parts = [f"{why}; port {self._port}, directory {self._workdir}"]
        for name in ("redis.log", "redis.out"):
            tail = _tail(self._workdir / name)
            if tail:
                parts.append(f"--- tail of {name} ---\n{tail}")
        return "\n".join(parts)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after a deadline). No RDB is written."""
        if self._proc is None:
            return
        if self._paused:
            self.resume()
        self._signal(signal.SIGTERM)
        try:
            self._proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._reap()

    def kill(self) -> None:
        """SIGKILL and wait: a crash. With ``appendonly`` no acknowledged write is lost."""
        if self._proc is None:
            return
        self._signal(signal.SIGKILL)
        self._proc.wait()
        self._reap()

    def _reap(self) -> None:
        self._proc = None
        self._paused = False
        self._close_output()

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def restart(self) -> None:
        """Stop, then start again on the same port and directory."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: it accepts nothing and answers nothing until resumed."""
        if not self.running:
            raise RuntimeError("redis-server is not running")
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused server."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the server and remove the directory if this object created it."""
        self.stop()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._own_workdir = False

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self._paused else "running" if self.running else "stopped"
        return f"RedisServer(port={self._port}, appendonly={self.appendonly}, {state})"
