"""apipool: use a paid external API at exactly its concurrent-connection limit.

General workers submit jobs with :class:`Client`; a pool of single-slot workers
(``apipool up`` locally, or pods reconciled by the operator) calls the API.
"""

from __future__ import annotations

from .client import Client, JobResult
from .envelope import Envelope
from .errors import (
    ApipoolError,
    ConfigError,
    EnvelopeError,
    JobExpired,
    JobFailed,
    PermanentError,
    QueueFull,
    RedisUnavailable,
    ResultTimeout,
    RetryAfter,
)
from .handlers import Call

__version__ = "0.1.0"

__all__ = [
    "ApipoolError",
    "Call",
    "Client",
    "ConfigError",
    "Envelope",
    "EnvelopeError",
    "JobExpired",
    "JobFailed",
    "JobResult",
    "PermanentError",
    "QueueFull",
    "RedisUnavailable",
    "ResultTimeout",
    "RetryAfter",
    "__version__",
]
