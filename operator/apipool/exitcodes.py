"""Exit codes of every ``apipool`` command, in one table.

=====  ====================  ==================================================
code   name                  meaning
=====  ====================  ==================================================
0      OK                    done; for ``submit --wait``/``result``: the job
                             succeeded; for ``demo``: the cap held, nothing lost
1      JOB_FAILED            the job was dead-lettered (the record says why)
2      USAGE                 bad arguments or settings, or a missing extra
3      REDIS_UNAVAILABLE     Redis could not be reached or refused a command
4      RESULT_TIMEOUT        no result within ``--wait``/``--timeout``
5      JOB_EXPIRED           the job's deadline passed before it was called
6      QUEUE_FULL            the pool's queue is at ``--max-queue-length``
7      CHECK_FAILED          ``demo``: the cap broke or a job was lost, or the
                             run itself failed
8      SLOT_OVERRUN          ``slot``: a sync handler overran its timeout; the
                             process leaves so that its connection dies with it
9      SLOT_STUCK            ``slot``: a stop overran its bound (task stacks
                             were printed to stderr)
130    INTERRUPTED           stopped by Ctrl-C (143: by SIGTERM), cleaned up
=====  ====================  ==================================================
"""

from __future__ import annotations

import enum

from .errors import (
    ApipoolError,
    ConfigError,
    EnvelopeError,
    JobExpired,
    JobFailed,
    QueueFull,
    RedisUnavailable,
    ResultTimeout,
)
from .protocol import Outcome


class ExitCode(enum.IntEnum):
    OK = 0
    JOB_FAILED = 1
    USAGE = 2
    REDIS_UNAVAILABLE = 3
    RESULT_TIMEOUT = 4
    JOB_EXPIRED = 5
    QUEUE_FULL = 6
    CHECK_FAILED = 7
    SLOT_OVERRUN = 8
    SLOT_STUCK = 9
    INTERRUPTED = 130


_BY_ERROR: tuple[tuple[type[ApipoolError], ExitCode], ...] = (
    (JobExpired, ExitCode.JOB_EXPIRED),  # before JobFailed: it is one
    (JobFailed, ExitCode.JOB_FAILED),
    (ResultTimeout, ExitCode.RESULT_TIMEOUT),
    (QueueFull, ExitCode.QUEUE_FULL),
    (RedisUnavailable, ExitCode.REDIS_UNAVAILABLE),
    (ConfigError, ExitCode.USAGE),
    (EnvelopeError, ExitCode.USAGE),
)


def for_error(exc: ApipoolError) -> ExitCode:
    """The exit code for an error apipool raised on purpose."""
    for kind, code in _BY_ERROR:
        if isinstance(exc, kind):
            return code
    return ExitCode.USAGE


def for_outcome(status: str) -> ExitCode:
    """The exit code for a job's result record status."""
    if status == Outcome.OK:
        return ExitCode.OK
    if status == Outcome.EXPIRED:
        return ExitCode.JOB_EXPIRED
    return ExitCode.JOB_FAILED
