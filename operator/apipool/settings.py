"""Settings of a slot worker and of the local supervisor: frozen, documented, checked."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

from . import defaults
from .errors import ConfigError

ENV_REDIS_URL = "APIPOOL_REDIS_URL"
ENV_OWNER = "APIPOOL_OWNER"
POOL_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def default_redis_url() -> str | None:
    return os.environ.get(ENV_REDIS_URL) or None


def default_owner() -> str:
    """Who may restart this process: the pod (``APIPOOL_OWNER``) or host and parent."""
    return os.environ.get(ENV_OWNER) or f"{socket.gethostname()}:{os.getppid()}"


def check_pool_name(pool: str) -> str:
    if not POOL_NAME.match(pool):
        raise ConfigError(
            f"pool name {pool!r} must be 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return pool


MIN_HANG_WINDOW = 0.3
"""Three of the worker's beats (every 0.1 s): a shorter window kills healthy workers."""


@dataclass(frozen=True)
class Timings:
    """Time budget of a slot. All values in seconds."""

    call_timeout: float = defaults.CALL_TIMEOUT
    """Longest a single handler call may run before it is cancelled."""
    fence_margin: float = defaults.FENCE_MARGIN
    """A call starts only while the lease stays valid for call_timeout + fence_margin."""
    heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL
    """How often the lease is renewed (and the liveness heartbeat ticks)."""
    health_grace: float = defaults.HEALTH_GRACE
    """/healthz fails once a call has run longer than call_timeout + health_grace."""
    take_block: float = defaults.TAKE_BLOCK
    """How long one blocking take waits for a job before checking the lease again."""
    hang_window: float = defaults.HANG_WINDOW
    """Under a keeper: silence of the worker's event loop after which it is killed."""

    def __post_init__(self) -> None:
        for name in ("call_timeout", "fence_margin", "heartbeat_interval", "take_block"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.health_grace < 0:
            raise ConfigError(f"health_grace must be >= 0 seconds, got {self.health_grace}")
        if self.hang_window < MIN_HANG_WINDOW:
            raise ConfigError(
                f"hang_window must be >= {MIN_HANG_WINDOW} seconds, got {self.hang_window}"
            )

    @property
    def lease_ttl(self) -> float:
        """Lease time to live: until the next renewal is due, a lease always leaves
        room for a blocking take followed by a whole call (plus the margin)."""
        return self.call_timeout + self.fence_margin + self.take_block + 3 * self.heartbeat_interval

    @property
    def shutdown_grace(self) -> float:
        """Bound on a graceful stop: finish the current call, then release."""
        return self.call_timeout + self.take_block + 2 * self.heartbeat_interval


@dataclass(frozen=True)
class Limits:
    """What one job (or a stranger pushing jobs) can make a slot hold. Bytes."""

    max_envelope_bytes: int = defaults.MAX_ENVELOPE_BYTES
    """Larger envelopes are dead-lettered unread (by size and hash)."""
    max_result_bytes: int = defaults.MAX_RESULT_BYTES
    """A handler result whose JSON is larger is refused: the job is dead-lettered."""
    max_response_bytes: int = defaults.MAX_RESPONSE_BYTES
    """The http handler stops reading a response past this; the call fails."""
    max_dead_letters: int = defaults.MAX_DEAD_LETTERS
    """The dead-letter list is trimmed to this many newest entries (0: no cap)."""

    def __post_init__(self) -> None:
        for name in ("max_envelope_bytes", "max_result_bytes", "max_response_bytes"):
            if getattr(self, name) < 256:
                raise ConfigError(f"{name} must be >= 256, got {getattr(self, name)}")
        if self.max_dead_letters < 0:
            raise ConfigError(f"max_dead_letters must be >= 0, got {self.max_dead_letters}")


@dataclass(frozen=True)
class HttpPolicy:
    """What the built-in ``http`` handler may call, and what it keeps secret."""

    allow_urls: tuple[str, ...] = ()
    """URL prefixes a job may call (empty: any public address). Loopback, private
    and link-local addresses are refused unless a prefix names them."""
    follow_redirects: bool = False
    """Follow redirects (at most 5; credentials are never sent to another origin)."""
    redact_headers: tuple[str, ...] = ()
    """Header names redacted in logs and dead letters, beyond the built-in list."""

    def __post_init__(self) -> None:
        for prefix in self.allow_urls:
            if not prefix.startswith(("http://", "https://")) or "://" not in prefix[:8]:
                raise ConfigError(f"allowed URL {prefix!r} must start with http:// or https://")


@dataclass(frozen=True)
class SlotSettings:
    """Everything one slot worker process needs."""

    pool: str
    """Pool name: a DNS label, shared by the producers and all slots."""
    slot: int
    """Slot index, 0 <= slot < N. Only one live process may hold a slot."""
    redis_url: str = ""
    """Redis holding the pool's queue, leases and results. It reaches a slot
    process through ``APIPOOL_REDIS_URL`` (it may hold a password), never its
    command line; '' here means: not known to this process (a manifest)."""
    handlers: tuple[str, ...] = (defaults.HANDLER,)
    """Handler specs: ``http``, ``module:function`` or ``name=module:function``; the
    first serves jobs that name no handler."""
    timings: Timings = field(default_factory=Timings)
    max_attempts: int = defaults.MAX_ATTEMPTS
    """A job is dead-lettered after failing this many attempts."""
    result_ttl: float = defaults.RESULT_TTL
    """Seconds a result stays readable."""
    limits: Limits = field(default_factory=Limits)
    http: HttpPolicy = field(default_factory=HttpPolicy)
    allow_eviction: bool = False
    """Serve even when Redis may evict keys (maxmemory with a policy other than
    noeviction): results and leases could then vanish. Off: the slot refuses."""
    owner: str = field(default_factory=default_owner)
    """Stable identity of whatever restarts this process (pod UID, supervisor id)."""
    health_host: str = "127.0.0.1"
    health_port: int = defaults.HEALTH_PORT
    """Port of /healthz, /readyz, /metrics; 0 picks a free one."""
    parent_pid: int | None = None
    """Stop gracefully when this parent process is gone (local supervisor)."""
    standby: bool = defaults.STANDBY
    """Run under a keeper with a warm standby (keeper.py)."""
    prefetch: bool = defaults.PREFETCH
    """Take the next job during a call when the queue is long, write a call's
    outcome during the next call (inflight.py)."""
    adaptive: bool = defaults.ADAPTIVE
    """Use fewer than N slots while the API keeps answering 429 (throttling.py)."""
    max_pause: float = defaults.MAX_PAUSE
    """The longest pool-wide pause a Retry-After can ask for (seconds)."""

    def __post_init__(self) -> None:
        check_pool_name(self.pool)
        if self.slot < 0:
            raise ConfigError(f"slot must be >= 0, got {self.slot}")
        if not self.handlers:
            raise ConfigError("at least one handler is needed")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.result_ttl <= 0:
            raise ConfigError(f"result_ttl must be > 0 seconds, got {self.result_ttl}")
        if "/" in self.owner:
            raise ConfigError(f"owner {self.owner!r} must not contain '/'")
        if not self.max_pause >= 0:
            raise ConfigError(f"max_pause must be >= 0 seconds, got {self.max_pause}")

    def to_argv(self) -> list[str]:
        """The ``apipool slot ...`` arguments that run these settings. The Redis
        URL and the owner travel in the environment (``APIPOOL_REDIS_URL``,
        ``APIPOOL_OWNER``): a command line is visible to every local user."""
        t = self.timings
        argv = [
            "slot",
            "--pool", self.pool,
            "--slot", str(self.slot),
            "--call-timeout", f"{t.call_timeout:g}",
            "--heartbeat-interval", f"{t.heartbeat_interval:g}",
            "--fence-margin", f"{t.fence_margin:g}",
            "--health-grace", f"{t.health_grace:g}",
            "--take-block", f"{t.take_block:g}",
            "--hang-window", f"{t.hang_window:g}",
            "--standby", "true" if self.standby else "false",
            "--prefetch", "true" if self.prefetch else "false",
            "--adaptive", "true" if self.adaptive else "false",
            "--max-pause", f"{self.max_pause:g}",
            "--max-attempts", str(self.max_attempts),
            "--result-ttl", f"{self.result_ttl:g}",
            *self.limits_argv(),
            "--health-host", self.health_host,
            "--health-port", str(self.health_port),
        ]  # fmt: skip
        for spec in self.handlers:
            argv += ["--handler", spec]
        for prefix in self.http.allow_urls:
            argv += ["--allow-url", prefix]
        for name in self.http.redact_headers:
            argv += ["--redact-header", name]
        if self.http.follow_redirects:
            argv.append("--follow-redirects")
        if self.allow_eviction:
            argv.append("--allow-eviction")
        if self.parent_pid is not None:
            argv += ["--parent-pid", str(self.parent_pid)]
        return argv

    def limits_argv(self) -> list[str]:
        lim = self.limits
        return [
            "--max-envelope-bytes", str(lim.max_envelope_bytes),
            "--max-result-bytes", str(lim.max_result_bytes),
            "--max-response-bytes", str(lim.max_response_bytes),
            "--max-dead-letters", str(lim.max_dead_letters),
        ]  # fmt: skip
