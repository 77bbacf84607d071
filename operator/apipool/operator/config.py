"""Settings of the operator, from the environment (documented defaults)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError

ENV_PREFIX = "APIPOOL_"


@dataclass(frozen=True)
class OperatorSettings:
    watch_namespaces: tuple[str, ...] = ()
    """APIPOOL_WATCH_NAMESPACES, comma-separated; empty: every namespace (cluster-wide)."""
    timer_interval: float = 10.0
    """APIPOOL_TIMER_INTERVAL: seconds between self-healing reconciles of each pool."""
    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    """APIPOOL_LIVENESS_ENDPOINT: kopf's liveness endpoint; empty: off."""
    metrics_port: int = 8082
    """APIPOOL_METRICS_PORT: Prometheus metrics of the operator; 0: off."""
    utilization_window: float = 60.0
    """APIPOOL_UTILIZATION_WINDOW: seconds over which status.utilization is averaged."""
    redis_timeout: float = 2.0
    """APIPOOL_REDIS_TIMEOUT: seconds the operator waits for Redis when it reads stats."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorSettings:
        env = dict(os.environ if env is None else env)

        def number(name: str, default: float) -> float:
            raw = env.get(ENV_PREFIX + name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{name} must be a number, not {raw!r}") from None
            if value < 0:
                raise ConfigError(f"{ENV_PREFIX}{name} must be >= 0, not {raw!r}")
            return value

        namespaces = tuple(
            ns.strip()
            for ns in env.get(ENV_PREFIX + "WATCH_NAMESPACES", "").split(",")
            if ns.strip()
        )
        settings = cls(
            watch_namespaces=namespaces,
            timer_interval=number("TIMER_INTERVAL", cls.timer_interval),
            liveness_endpoint=env.get(ENV_PREFIX + "LIVENESS_ENDPOINT", cls.liveness_endpoint),
            metrics_port=int(number("METRICS_PORT", cls.metrics_port)),
            utilization_window=number("UTILIZATION_WINDOW", cls.utilization_window),
            redis_timeout=number("REDIS_TIMEOUT", cls.redis_timeout),
        )
        if settings.timer_interval <= 0:
            raise ConfigError(f"{ENV_PREFIX}TIMER_INTERVAL must be > 0")
        return settings
